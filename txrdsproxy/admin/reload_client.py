"""The client side of `rdsproxy reload`: POST /reload signed with SigV4 (botocore's signer), or
SIGHUP to the process of a twistd pid file (`--pidfile`)."""

import json
import os
import signal
import urllib.error
import urllib.request

EXIT_API_ERROR, EXIT_UNREACHABLE = 254, 255


def reload(args, data, stdout, stderr):
    pidfile = getattr(args, "pidfile", None)
    if pidfile:
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as e:
            stderr.write(f"rdsproxy: cannot signal the process of {pidfile}: {e}\n")
            return EXIT_UNREACHABLE
        stdout.write(f"sent SIGHUP to {pid} (the outcome is in its log)\n")
        return 0
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from txrdsproxy.cli import make_client
    session, _, region, unsigned = make_client(args, data)
    url = args.endpoint_url.rstrip("/") + "/reload"
    request = AWSRequest(method="POST", url=url, data=b"",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    if not unsigned:
        SigV4Auth(session.get_credentials(), "rds", region).add_auth(request)
    prepared = request.prepare()
    req = urllib.request.Request(url, data=b"", method="POST", headers=dict(prepared.headers))
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as response:
            body = json.loads(response.read().decode())
    except urllib.error.HTTPError as e:
        try:
            error = json.loads(e.read().decode()).get("Error", {})
        except ValueError:
            error = {"Code": f"HTTP{e.code}", "Message": str(e.reason)}
        stderr.write(f"\nAn error occurred ({error.get('Code')}) when reloading: {error.get('Message')}\n")
        return EXIT_API_ERROR
    except (OSError, ValueError) as e:
        stderr.write(f"\nCould not connect to the endpoint URL: \"{url}\" ({e})\n")
        return EXIT_UNREACHABLE
    changes = body.get("Changes", [])
    stdout.write("".join(f"{line}\n" for line in changes) or "no change\n")
    return 0

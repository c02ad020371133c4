"""Operations of ours in the RDS API's own terms: extra shapes merged into botocore's RDS model.

`model/rds/<api version>/service-2.sdk-extras.json` is a botocore "sdk-extras" file: botocore's
loader merges it into the RDS service model when the model is loaded, so the server's codec
(querycodec.py), the `rdsproxy` CLI and any botocore/boto3 client given this search path see
`DescribeDBProxySessions` exactly as they see RDS's own operations (request decoding, XML
response, `client.describe_db_proxy_sessions(...)`).  Call `install(session)` before the
session loads the RDS model.
"""

import os

MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
EXTENSION_ACTIONS = ("DescribeDBProxySessions",)


def install(session):
    """Put our model extras on *session*'s (botocore.session.Session) data path; idempotent."""
    loader = session.get_component("data_loader")
    if MODEL_PATH not in loader.search_paths:
        loader.search_paths.insert(0, MODEL_PATH)
    return session

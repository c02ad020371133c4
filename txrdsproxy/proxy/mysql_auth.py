"""Client authentication of a MySQL session against the secrets store.

The plugin comes from the user's `Auth` entry (ClientPasswordAuthType): mysql_native_password
(the default) or caching_sha2_password.  When the client answered the greeting with another
plugin, or for COM_CHANGE_USER (always, with a fresh scramble), the proxy sends an
AuthSwitchRequest.  Verifiers (SHA1(SHA1(pw)), SHA256(SHA256(pw))) are derived once per secret
value.

caching_sha2_password behaves as a MySQL 8 server does: the first login of a user (per secret
value) after the proxy starts takes the full path (AuthMoreData 0x04, then the client fetches the
proxy's RSA public key and sends its password encrypted with it); once that succeeded, later logins
take the fast path (the scramble, AuthMoreData 0x03).  Clients that refuse RSA over plain TCP
(mysql-connector-python) need TLS for that first login.
"""


from collections import namedtuple

from txrdsproxy.auth.iam import TooManyAuthentications, verify_login
from txrdsproxy.config import model
from txrdsproxy.wire.mysql import errors
from txrdsproxy.wire.mysql import auth as myauth
from txrdsproxy.wire.mysql import handshake as hs
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.mysql.packets import ProtocolError

ChangeUser = namedtuple("ChangeUser", "user auth_response database charset auth_plugin")


def parse_change_user(payload, caps):
    """COM_CHANGE_USER payload (after the command byte) -> ChangeUser."""
    try:
        user, pos = P.read_nul_str(payload, 0)
        if caps & P.CLIENT_SECURE_CONNECTION:
            n = payload[pos]
            auth = payload[pos + 1:pos + 1 + n]
            if len(auth) != n:
                raise ProtocolError("truncated COM_CHANGE_USER")
            pos += 1 + n
        else:
            auth, pos = P.read_nul_str(payload, pos)
        database, pos = P.read_nul_str(payload, pos) if pos < len(payload) else (b"", pos)
        charset = None
        if pos + 2 <= len(payload):
            charset = payload[pos] | (payload[pos + 1] << 8)
            pos += 2
        plugin = None
        if caps & P.CLIENT_PLUGIN_AUTH and pos < len(payload):
            name, pos = P.read_nul_str(payload, pos)
            plugin = name.decode("ascii", "replace")
        return ChangeUser(user.decode("utf-8"), bytes(auth), database.decode("utf-8") or None,
                          charset, plugin)
    except (IndexError, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed COM_CHANGE_USER: {e}")


class ClientAuth:
    """One authentication exchange with a client; reports to the session.

    The session provides `write_packet(payload, seq)`, `auth_succeeded(user, database,
    charset_id, next_seq)` and `auth_failed(user, why, next_seq)`.
    """

    def __init__(self, session):
        self.session = session
        self.scramble = hs.make_scramble()
        self._request = None
        self._creds = None
        self._plugin = None
        self._sha2 = None
        self._iam_waiting = False
        self._secrets_waiting = False  # the secrets store's first read is awaited (`start`)
        self.used_password = True

    def start(self, user, client_plugin, response, database, charset, seq, switch):
        """The client's first auth response (HandshakeResponse41 or COM_CHANGE_USER)."""
        self._request = (user, database, charset)
        self.used_password = bool(response) or switch
        pending = self.session.ctx.secrets_loading()
        if pending is not None:  # the store's first read: wait for it (within ClientAuthTimeout)
            self._secrets_waiting = True
            pending.addCallback(self._secrets_loaded, user, client_plugin, response, database,
                                charset, seq, switch).addErrback(self.session.unexpected, "secrets")
            return
        found = self.session.ctx.find_user(user)
        if found is None:
            return self.session.auth_failed(user, "no secret for this user", seq)
        entry, self._creds = found
        if entry.iam_auth == "REQUIRED":
            return self._start_iam(client_plugin, response, seq, switch)
        if entry.client_password_auth_type == model.MYSQL_CACHING_SHA2:
            self._plugin = myauth.CACHING_SHA2_PASSWORD
        else:
            self._plugin = myauth.NATIVE_PASSWORD
        if switch or (client_plugin or myauth.NATIVE_PASSWORD) != self._plugin:
            self.scramble = hs.make_scramble()
            self.session.write_packet(hs.auth_switch_request(self._plugin, self.scramble), seq)
            return
        self._check(response, seq)

    def _secrets_loaded(self, _, *request):
        self._secrets_waiting = False
        if not self.session.closed:
            self.start(*request)

    def feed(self, seq, payload):
        """A further auth packet from the client (after a switch, or caching_sha2 full auth)."""
        if self._iam_waiting or self._secrets_waiting:
            return self.session.auth_failed(self._request[0], "packet while the IAM token or the"
                                            " secrets are read", seq + 1)
        if self._plugin == myauth.CLEAR_PASSWORD:
            return self._verify_iam(payload, seq + 1)
        if self._sha2 is not None:
            for out in self._sha2.feed(payload):
                self.session.write_packet(out, seq + 1)
                seq += 1
            return self._finish_sha2(seq + 1)
        self._check(payload, seq + 1)

    # -- IAMAuth REQUIRED: the password is an IAM token, sent in clear (over TLS only) -------------
    def _start_iam(self, client_plugin, response, seq, switch):
        user = self._request[0]
        if not self.session.tls:
            return self.session.auth_failed(user, "IAM authentication without TLS", seq,
                                            error=errors.iam_requires_tls(user))
        self._plugin = myauth.CLEAR_PASSWORD
        if client_plugin == myauth.CLEAR_PASSWORD and response and not switch:
            return self._verify_iam(response, seq)
        self.session.write_packet(hs.auth_switch_request(myauth.CLEAR_PASSWORD, b""), seq)

    def _verify_iam(self, response, seq):
        user = self._request[0]
        token = myauth.parse_clear_password(response)
        self.used_password = True
        self._iam_waiting = True
        d = verify_login(self.session.ctx, token, user, self.session.transport)

        def passed(principal):
            self._iam_waiting = False
            if self.session.closed:
                return
            self.session.log.info("{s}: IAM authentication of {user} as {principal}",
                                  s=self.session, user=user, principal=principal)
            self._succeed(seq)

        def refused(failure):
            self._iam_waiting = False
            if self.session.closed:
                return
            error = errors.iam_rate_limit() if failure.check(TooManyAuthentications) else None
            self.session.auth_failed(user, "IAM token refused", seq, error=error)

        d.addCallbacks(passed, refused)

    def _check(self, response, seq):
        user = self._request[0]
        self.used_password = bool(response)
        if self._plugin == myauth.NATIVE_PASSWORD:
            verifier = self._creds.derived("mysql-native", myauth.NativeVerifier.from_password)
            if verifier.check(self.scramble, response):
                return self._succeed(seq)
            return self.session.auth_failed(user, "wrong password", seq)
        verifier = self._creds.derived("mysql-sha2", myauth.Sha2Verifier.from_password)
        self._cache_key = (user, verifier.stored)
        cached = self._cache_key in sha2_cache(self.session.ctx)
        self._sha2 = myauth.CachingSha2ServerAuth(
            verifier, self.scramble, cached=cached, tls=self.session.tls,
            rsa_private_key=None if cached else rsa_key(self.session.ctx))
        for out in self._sha2.start(response):
            self.session.write_packet(out, seq)
            seq += 1
        self._finish_sha2(seq)

    def _finish_sha2(self, seq):
        if not self._sha2.done:
            return
        if self._sha2.succeeded:
            if self._sha2.full_auth_used:
                sha2_cache(self.session.ctx).add(self._cache_key)
            return self._succeed(seq)
        return self.session.auth_failed(self._request[0], self._sha2.failure_reason, seq)

    def _succeed(self, seq):
        user, database, charset = self._request
        self._creds = None
        self.session.auth_succeeded(user, database, charset, seq)


def sha2_cache(ctx):
    """(user, SHA256(SHA256(password))) of users who passed full authentication: the fast path."""
    cache = getattr(ctx, "mysql_sha2_cache", None)
    if cache is None:
        cache = ctx.mysql_sha2_cache = set()
    return cache


def rsa_key(ctx):
    """The proxy's RSA key for caching_sha2 full authentication, made on first need."""
    key = getattr(ctx, "mysql_rsa_key", None)
    if key is None:
        from cryptography.hazmat.primitives.asymmetric import rsa
        key = ctx.mysql_rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key

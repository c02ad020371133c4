"""The validated configuration: frozen dataclasses named after the RDS API's shapes.

Field names are snake_case here; `load.py` maps them from the RDS API's PascalCase keys
(`DBProxyName` -> `name` and so on) so that the YAML file and `describe-*` output read the same.
Everything in this module is immutable: a reload builds a new tree.
"""

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

ENGINE_POSTGRESQL = "POSTGRESQL"
ENGINE_MYSQL = "MYSQL"
ENGINE_FAMILIES = (ENGINE_POSTGRESQL, ENGINE_MYSQL)

PG_SCRAM = "POSTGRES_SCRAM_SHA_256"
PG_MD5 = "POSTGRES_MD5"
MYSQL_NATIVE = "MYSQL_NATIVE_PASSWORD"
MYSQL_CACHING_SHA2 = "MYSQL_CACHING_SHA2_PASSWORD"
CLIENT_AUTH_TYPES = {
    ENGINE_POSTGRESQL: (PG_SCRAM, PG_MD5),
    ENGINE_MYSQL: (MYSQL_NATIVE, MYSQL_CACHING_SHA2),
}
DEFAULT_CLIENT_AUTH_TYPE = {ENGINE_POSTGRESQL: PG_SCRAM, ENGINE_MYSQL: MYSQL_NATIVE}

EXCLUDE_VARIABLE_SETS = "EXCLUDE_VARIABLE_SETS"
# Ours: protocol-level prepared statements (PostgreSQL named statements, MySQL COM_STMT_PREPARE)
# are tracked per session and prepared again where needed, not pinned.
EXCLUDE_PREPARED_STATEMENTS = "EXCLUDE_PREPARED_STATEMENTS"
PINNING_FILTERS = {
    ENGINE_POSTGRESQL: (EXCLUDE_VARIABLE_SETS, EXCLUDE_PREPARED_STATEMENTS),
    ENGINE_MYSQL: (EXCLUDE_VARIABLE_SETS, EXCLUDE_PREPARED_STATEMENTS),
}


@dataclass(frozen=True)
class UserAuthConfig:
    """One `Auth` entry: which secret holds the credentials of one database user."""

    secret_arn: str
    auth_scheme: str = "SECRETS"
    iam_auth: str = "DISABLED"
    client_password_auth_type: str = ""
    description: str = ""


@dataclass(frozen=True)
class ConnectionPoolConfig:
    max_connections_percent: int = 100
    max_idle_connections_percent: int = 50
    connection_borrow_timeout: float = 120.0
    # Ours (PgBouncer's server_idle_timeout): idle connections above MaxIdleConnectionsPercent
    # are closed once idle this long (seconds), oldest first, by the pool's janitor.
    idle_connection_timeout: float = 60.0
    session_pinning_filters: Tuple[str, ...] = ()
    init_query: str = ""

    @property
    def exclude_variable_sets(self) -> bool:
        return EXCLUDE_VARIABLE_SETS in self.session_pinning_filters

    @property
    def exclude_prepared_statements(self) -> bool:
        return EXCLUDE_PREPARED_STATEMENTS in self.session_pinning_filters


@dataclass(frozen=True)
class HealthCheckConfig:
    """Ours (`HealthCheck`, on a proxy and on a target; the target's wins): who the failover
    health checks log in as, and where.

    secret_arn: a secret of its own for the checks (need not be one of the proxy's Auth entries);
    user_name: one of the users the proxy's Auth secrets hold; neither: the first Auth secret the
    target accepts (each in turn until one logs in; the one that did is kept for the target).
    database: PostgreSQL database the checks connect to ("" = postgres).
    retries: times a quick failure of the writer's check is repeated (backoff 0.5 s, doubling,
    never past the next round) before the proxy treats the writer as lost (proxy level only).
    """

    secret_arn: str = ""
    user_name: str = ""
    database: str = ""
    retries: int = 2


@dataclass(frozen=True)
class DBProxyTarget:
    rds_resource_id: str
    endpoint: str
    port: int
    role: str = ""  # "" = discovered; READ_WRITE or READ_ONLY when given
    health_check: Optional[HealthCheckConfig] = None  # None: the proxy's HealthCheck


@dataclass(frozen=True)
class DBProxyTargetGroup:
    name: str
    connection_pool_config: ConnectionPoolConfig
    targets: Tuple[DBProxyTarget, ...]


@dataclass(frozen=True)
class TLSConfig:
    """Client-side TLS: PEM files (absolute paths once loaded), reloaded when they change."""

    certificate_file: str
    private_key_file: str


DB_TLS_MODES = ("follow-client", "disable", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class DatabaseTLSConfig:
    """TLS from the proxy to its databases (`DatabaseTLS`).

    mode: follow-client (TLS when the client's connection is TLS; verifies like verify-full when
    a CAFile is given, like require otherwise), disable, prefer (TLS when the database offers
    it, unverified), require (TLS, unverified), verify-ca (chain to CAFile or the system roots),
    verify-full (chain and the target's Endpoint as the certificate's DNS name or IP address).
    """

    mode: str = "follow-client"
    ca_file: str = ""  # absolute once loaded; "" = the system's trust roots
    allow_cleartext_password: bool = False  # send a cleartext password to a database without TLS
    server_public_key_file: str = ""  # MySQL caching_sha2 full auth without TLS: the server's RSA key


READ_WRITE = "READ_WRITE"
READ_ONLY = "READ_ONLY"
ENDPOINT_TARGET_ROLES = (READ_WRITE, READ_ONLY)
DEFAULT_ENDPOINT_NAME = "default"  # the proxy's own Listen, as DescribeDBProxyEndpoints lists it


@dataclass(frozen=True)
class DBProxyEndpoint:
    """One more listening endpoint of a proxy (`Endpoints`, the RDS API's DBProxyEndpoint).

    The proxy's own `Listen` is its default endpoint (READ_WRITE).  A READ_ONLY endpoint lends
    connections to the healthy replicas of the target group (failover/readers.py); with
    *fallback_to_writer* it lends the writer's when no replica is in the reader set, otherwise
    a borrow then fails (docs/errors.md).  A READ_WRITE endpoint is one more address of the
    default endpoint.
    """

    name: str
    listen: str
    target_role: str = READ_WRITE
    fallback_to_writer: bool = False  # ours: READ_ONLY only
    # Kept for the RDS API's shapes; they change nothing here.
    vpc_subnet_ids: Tuple[str, ...] = ()
    vpc_security_group_ids: Tuple[str, ...] = ()


@dataclass(frozen=True)
class DBProxy:
    name: str
    engine_family: str
    listen: str
    auth: Tuple[UserAuthConfig, ...]
    target_group: DBProxyTargetGroup
    require_tls: bool = False
    idle_client_timeout: float = 1800.0
    debug_logging: bool = False
    max_client_connections: int = 10000
    max_connection_rate: float = 0.0  # new client connections per second; 0 = unlimited
    max_message_size: int = 64 * 1024 * 1024
    health_check_interval: float = 5.0  # seconds between failover health checks (several targets)
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    tls: Optional[TLSConfig] = None  # client-side TLS termination; None = clients are refused TLS
    # Liveness (ours; RDS Proxy does not expose these): see docs/security.md "Limits and timeouts".
    client_first_packet_timeout: float = 5.0  # accept -> first complete packet from the client
    client_auth_timeout: float = 60.0  # accept -> end of authentication
    max_cancel_rate: float = 100.0  # PostgreSQL CancelRequests per second; 0 = unlimited
    database_connect_timeout: float = 30.0  # TCP connect + login + InitQuery to the database
    database_operation_timeout: float = 30.0  # one internal operation (sync, reset, probe query)
    database_tls: DatabaseTLSConfig = field(default_factory=DatabaseTLSConfig)
    resource_id: str = ""  # prx- + 17 hex (DBProxyResourceId, or derived from the name at load)
    endpoint: str = ""  # the host name clients use (IAM tokens name it); "" = the listening address
    endpoints: Tuple[DBProxyEndpoint, ...] = ()  # more endpoints (DBProxyEndpoint), reader ones
    # Ours: a replica whose replay lag exceeds this many seconds leaves the reader set until it
    # has caught up (TargetHealth UNAVAILABLE, INVALID_REPLICATION_STATE); 0 = no bound.
    max_replica_lag: float = 0.0
    # Ours: bytes a pinned session may record (its prepared statements) to be moved to a new
    # writer at a switchover instead of being ended; 0 = pinned sessions are never moved.
    max_session_replay_size: int = 65536
    # Kept for the RDS API's shapes (CreateDBProxy requires them); they change nothing here.
    role_arn: str = ""
    vpc_subnet_ids: Tuple[str, ...] = ()
    vpc_security_group_ids: Tuple[str, ...] = ()


@dataclass(frozen=True)
class SecretsConfig:
    backend: str = "file"  # file | aws
    path: str = ""  # file: the JSON file
    region: str = ""  # aws: the Secrets Manager region
    endpoint_url: str = ""  # aws: another endpoint (a local one in tests)
    refresh_interval: float = 300.0  # aws: seconds between background refreshes


@dataclass(frozen=True)
class IAMAccessKey:
    access_key_id: str
    secret_arn: str  # the secret holding {"secret_access_key": ..., "session_token": ...optional}


@dataclass(frozen=True)
class IAMPrincipal:
    arn: str
    access_keys: Tuple[IAMAccessKey, ...]
    policies: Tuple[Any, ...]  # auth.policy.Policy, parsed and validated at load


@dataclass(frozen=True)
class IAMConfig:
    """The IAM principal store (`IAM`): who may sign IAM tokens and management API calls."""

    region: str = "us-east-1"
    account_id: str = "000000000000"
    principals: Tuple[IAMPrincipal, ...] = ()
    max_concurrent_authentications: int = 256


@dataclass(frozen=True)
class AdminConfig:
    listen: Optional[str] = None
    # Read-only API calls (Describe*) from loopback without a SigV4 signature (the demo's).
    allow_unauthenticated_loopback_reads: bool = False
    # Where a proxy created through the API listens when its Tags name no txrdsproxy:Listen
    # (port 0: a free port, written into the file once bound).
    default_listen: str = "tcp:0:interface=127.0.0.1"


@dataclass(frozen=True)
class DBInstance:
    """A database instance the API may register as a target (by DBInstanceIdentifier)."""

    identifier: str
    endpoint: str
    port: int


@dataclass(frozen=True)
class Config:
    source: str
    proxies: Tuple[DBProxy, ...]
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    iam: IAMConfig = field(default_factory=IAMConfig)
    db_instances: Tuple[DBInstance, ...] = ()
    drain_timeout: float = 30.0  # SIGTERM / DeleteDBProxy: seconds open transactions may finish
    workers: int = 1  # worker processes sharing the listeners (txrdsproxy/workers/); 1: no extra process
    state_directory: str = ""  # where fencing decisions are kept (failover/fencing.py); "": the file's folder

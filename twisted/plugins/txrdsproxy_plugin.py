from twisted.application.service import ServiceMaker

rdsproxy = ServiceMaker(
    "txrdsproxy",
    "txrdsproxy.tap",
    "A database proxy in the manner of Amazon RDS Proxy (PostgreSQL and MySQL)",
    "rdsproxy",
)

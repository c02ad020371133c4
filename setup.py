from setuptools import find_packages, setup

setup(
    name="txrdsproxy",
    version="0.1.0",
    description="A self-hosted database proxy in the manner of Amazon RDS Proxy, on Twisted",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/txrdsproxy_plugin.py"],
                  "txrdsproxy": ["admin/model/rds/*/*.json", "admin/console/*"]},
    entry_points={"console_scripts": ["rdsproxy = txrdsproxy.cli:main"]},
    install_requires=[
        "Twisted>=22.10",
        "PyYAML>=5.4",
        "pyOpenSSL>=22.0",
        "service_identity>=21.1",
        "botocore>=1.31",  # SigV4 (IAM tokens, management API), the RDS model, Secrets Manager
        "ruamel.yaml>=0.17",  # API changes written into the config file, comments and order kept
        "zope.interface>=5.0",
        "prometheus_client>=0.17",
        "txaio>=23.1",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            # psycopg-binary has no PyPy wheels: on PyPy psycopg runs in its pure-Python mode
            # over the system's libpq (Debian's libpq5, installed with postgresql).
            "psycopg[binary]>=3.1; platform_python_implementation == 'CPython'",
            "psycopg>=3.1; platform_python_implementation != 'CPython'",
            # asyncpg is Cython over CPython's C API: no PyPy build; its tests skip there only.
            "asyncpg>=0.27; platform_python_implementation == 'CPython'",
            "PyMySQL>=1.0",
            "boto3>=1.28",  # generate_db_auth_token in the IAM tests
            "awscli>=1.29",  # aws rds generate-db-auth-token in the IAM tests
            "moto[server]>=5.0",  # a local Secrets Manager endpoint (Secrets Backend aws tests)
            # 26.x C extensions need OpenSSL 3.2 (Debian 12 has 3.0); 9.x vendor their own libssl.
            "mysql-connector-python>=8.0,<26",
            # The aws command (v1, from PyPI) drives the management API in tests; it pins the
            # botocore it needs, and pip picks a boto3 that matches.
            "awscli>=1.29",
            "hypothesis>=6",  # property-based differential tests of the classifiers
            "selenium>=4.10",  # the console page test drives Debian's chromium + chromium-driver
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Topic :: Database",
        "Programming Language :: Python :: 3",
    ],
)

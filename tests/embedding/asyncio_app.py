"""An asyncio application embedding txrdsproxy and querying PostgreSQL through it with asyncpg.

Run as a script by test_embed_asyncio.py (argv: PG host, port, app_scram password, database);
prints one JSON line with what it saw.  It is also the example of docs/embedding.md.
"""

import asyncio
import json
import sys

from twisted.internet import asyncioreactor


def main(host, port, password, database):
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)  # before anything imports twisted.internet.reactor

    import asyncpg

    from txrdsproxy.embed import EmbeddedProxies

    config = {"DBProxies": [{
        "DBProxyName": "aio-pg", "EngineFamily": "POSTGRESQL", "Listen": "tcp:0:interface=127.0.0.1",
        "Auth": [{"SecretArn": "arn:app", "ClientPasswordAuthType": "POSTGRES_SCRAM_SHA_256"}],
        "TargetGroups": [{"Targets": [{"RdsResourceId": "pg-1", "Endpoint": host, "Port": int(port)}]}],
    }]}
    secrets = {"arn:app": {"username": "app_scram", "password": password}}

    async def run():
        proxies = EmbeddedProxies(config, secrets=secrets)
        started = proxies.start()
        out = {"future": asyncio.isfuture(started)}
        await started
        proxy_host, proxy_port = proxies.address("aio-pg")
        pool = await asyncpg.create_pool(host=proxy_host, port=proxy_port, user="app_scram",
                                         password=password, database=database, ssl=False,
                                         min_size=2, max_size=4)
        rows = await asyncio.gather(*(pool.fetchval("SELECT $1::int * 2", i) for i in range(20)))
        out["sum"] = sum(rows)
        out["user"] = await pool.fetchval("SELECT current_user")
        await pool.close()
        stopped = proxies.stop()
        out["stop_future"] = asyncio.isfuture(stopped)
        await stopped
        out["after_stop"] = proxies.addresses()
        return out

    result = loop.run_until_complete(run())
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:5])

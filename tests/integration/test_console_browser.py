"""The console page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium)
against a proxy under load: the numbers it shows match /metrics, a pinned session is listed with
its reason and masked statement, the targets with health and role, and the page loads nothing from
outside the admin listener."""

import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request

import psycopg
import pytest

try:
    from proxyutil import wait_for, write_proxy_config
    from test_metrics_live import Scraper, start_with_admin
except ImportError:
    from tests.integration.proxyutil import wait_for, write_proxy_config
    from tests.integration.test_metrics_live import Scraper, start_with_admin

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _first(paths):
    return next((p for p in paths if os.access(p, os.X_OK)), None)


@pytest.fixture
def browser():
    browser_path, driver_path = _first(CHROMIUM), _first(CHROMEDRIVER)
    if browser_path is None or driver_path is None:
        reason = "chromium / chromium-driver not installed (make setup)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_console_page_under_load(pg_server, tmp_path, browser):
    from selenium.webdriver.common.by import By
    path = write_proxy_config(tmp_path, pg_server, name="con-pg", MaxConnectionsPercent=20)
    proxy = start_with_admin(path)
    conns = []
    try:
        scrape = Scraper(proxy)
        base = scrape.url.rsplit("/", 1)[0]
        # Load: 3 clients running short transactions; one pinned session held open.
        stop = threading.Event()
        errors = []

        def client():
            try:
                with psycopg.connect(proxy.dsn(pg_server, sslmode="disable"), autocommit=True,
                                     prepare_threshold=None) as c:
                    while not stop.is_set():
                        c.execute("SELECT count(*) FROM generate_series(1, 100)")
            except Exception as e:  # reported below
                errors.append(repr(e))

        workers = [threading.Thread(target=client) for _ in range(3)]
        for w in workers:
            w.start()
        pinned = psycopg.connect(proxy.dsn(pg_server, sslmode="disable"), autocommit=True)
        conns.append(pinned)
        pinned.execute("SET statement_timeout = '12345s'")  # pins (set_variable)

        browser.get(base + "/console")
        assert browser.title.startswith("Proxies")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-pinned-sessions="con-pg"]'),
              what="the pinned session on the page")
        # Under load: the page keeps refreshing (graphs grow) while clients run.
        first = browser.find_element(By.ID, "status").get_attribute("data-updated")
        wait_for(lambda: browser.find_element(By.ID, "status").get_attribute("data-updated") != first,
              what="a refresh")
        stop.set()
        for w in workers:
            w.join(30)
        assert not errors, errors

        # Quiet now (the load's sessions ended, the pinned one stays): the page and /metrics agree
        # once the page shows data read after this point.  The page re-renders every 3 s, which
        # would both race with a refresh whose data was read before the quiet point and replace
        # elements under the checks below (stale elements): so the timed refreshes stop first
        # (the one already scheduled or in flight renders once more and hands the page's refresh
        # function to the no-op setTimeout), then one refresh of ours.
        proxy.wait_for(lambda: scrape.value("rdsproxy_client_connections", proxy_name="con-pg") == 1,
                       what="the load's sessions to end")

        def updated():
            return browser.find_element(By.ID, "status").get_attribute("data-updated")

        seen = browser.execute_script(  # atomic in the page: no render can slip in between
            "window.setTimeout = function (again) { window.testRefresh = again; };"
            " return document.getElementById('status').getAttribute('data-updated');")
        wait_for(lambda: updated() != seen and browser.execute_script("return !!window.testRefresh;"),
                 what="the last timed refresh")
        seen = browser.execute_script(
            "var seen = document.getElementById('status').getAttribute('data-updated');"
            " window.testRefresh(); return seen;")
        wait_for(lambda: updated() != seen, what="a refresh after the load")
        metrics = scrape.samples()

        def on_page(figure):
            return float(browser.find_element(
                By.CSS_SELECTOR, f'[data-proxy="con-pg"][data-figure="{figure}"]').text)

        P = (("proxy_name", "con-pg"),)
        T = (("proxy_name", "con-pg"), ("target", "pg-1"), ("target_group", "default"))
        assert on_page("client_connections") == metrics[("rdsproxy_client_connections", P)] == 1
        for figure in ("database_connections", "database_connections_currently_borrowed",
                       "database_connections_currently_session_pinned",
                       "database_connections_currently_in_transaction",
                       "max_database_connections_allowed"):
            assert on_page(figure) == metrics[("rdsproxy_" + figure, T)], figure
        assert on_page("database_connections_currently_session_pinned") == 1
        assert on_page("max_database_connections_allowed") == 20

        # The pinned session, with its reason and the statement masked.
        row = browser.find_element(By.CSS_SELECTOR, '[data-pinned-sessions="con-pg"] tbody tr')
        assert row.find_element(By.CSS_SELECTOR, "[data-pin-reason]").text == "set_variable"
        assert row.find_element(By.CSS_SELECTOR, "[data-pin-statement]").text == "SET statement_timeout = ?"
        assert "12345" not in browser.page_source
        # Targets with health and role; the graphs are drawn.
        target = browser.find_element(By.CSS_SELECTOR, '[data-target="pg-1"]')
        assert "READ_WRITE" in target.text
        assert target.find_element(By.CSS_SELECTOR, "[data-health]").text == "AVAILABLE"
        for graph in ("connections", "borrow", "pins"):
            line = browser.find_element(By.CSS_SELECTOR, f"#graph-con-pg-{graph} polyline")
            assert line.get_attribute("points").count(",") >= 2, graph
        pins_legend = browser.find_element(By.CSS_SELECTOR, '#graph-con-pg-pins .legend [data-series="set_variable"]')
        assert pins_legend.text.endswith(": 1")
        # Nothing but this listener was asked for, and the page logged no error.
        resources = browser.execute_script(
            "return performance.getEntriesByType('resource').map(function (e) { return e.name; })")
        assert resources and all(r.startswith(base + "/") for r in resources), resources
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        for c in conns:
            c.close()
        proxy.stop()


def test_console_data_refused_off_loopback_is_documented_and_on_loopback_served(pg_server, tmp_path):
    """The data carries user names and client addresses: loopback only (checked here from
    loopback: served; the refusal path is a unit test)."""
    proxy = start_with_admin(write_proxy_config(tmp_path, pg_server, name="con-pg2"))
    try:
        base = Scraper(proxy).url.rsplit("/", 1)[0]
        with urllib.request.urlopen(base + "/console/data.json", timeout=10) as r:
            assert r.headers["Content-Type"] == "application/json"
            assert b'"con-pg2"' in r.read()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/console/nope", timeout=10)
        assert e.value.code == 404
    finally:
        proxy.stop()

"""The dashboard in a real browser: Debian's chromium, driven by Playwright, against a real Braid
server process. Every check is on the page as it changes live, never after a reload.

Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_process import ROOT, ServerProcess, running_server

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT_MS = 20_000

DEMO = """
name: browser-demo
description: A template, a short timer, then a streaming LLM answer.
input:
  type: object
  required: [topic]
  properties: {topic: {type: string, minLength: 1}}
nodes:
  plan:
    agent: template
    template: "Plan for {{ input.topic }}"
  pause:
    agent: wait
    seconds: 1.5
  write:
    agent: llm
    prompt: "Write two sentences about {{ input.topic }}."
edges:
  - {from: plan, to: pause}
  - {from: pause, to: write}
output: outputs.write
"""

SLOW = """
name: slow
description: One long timer, to cancel.
nodes:
  nap: {agent: wait, seconds: 30}
"""


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("BRAID_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} and BRAID_REQUIRE_SERVICES=1")
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    _require_chromium()
    subprocess.run(["bash", str(ROOT / "scripts" / "fetch_htmx.sh")], check=True)  # quick when present
    # The mock model streams slowly enough to watch its text arrive.
    with running_server(tmp_path_factory.mktemp("browser"), {"BRAID_MOCK_DELAY": "0.03"}) as process:
        for spec in (DEMO, SLOW):
            answer = httpx.post(
                f"{process.url}/graphs", content=spec, headers={"Content-Type": "application/yaml"}
            )
            assert answer.status_code == 201, answer.text
        yield process


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    from playwright.sync_api import Browser

    assert isinstance(browser, Browser)
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page: object, name: str) -> None:
    from playwright.sync_api import Page

    assert isinstance(page, Page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_start_a_run_from_the_graph_page_and_watch_it_live(server: ServerProcess, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(f"{server.url}/")
    expect(page.locator("h1")).to_have_text("Runs")
    expect(page.locator("header .mock")).to_contain_text("mock model")
    shot(page, "01-runs-empty")

    page.get_by_role("link", name="Graphs").click()
    page.get_by_role("link", name="browser-demo").click()
    expect(page.locator("#diagram svg g.node")).to_have_count(3)
    expect(page.locator("#graph-yaml")).to_contain_text("agent: wait")

    # A schema problem is shown in the form, with its path, and nothing starts.
    page.fill("#run-input-field", '{"topic": ""}')
    page.get_by_role("button", name="Start run").click()
    expect(page.locator(".problems")).to_contain_text("input.topic")
    shot(page, "02-graph-form-problem")

    page.fill("#run-input-field", '{"topic": "tides"}')
    page.get_by_role("button", name="Start run").click()
    page.wait_for_url(re.compile(r"/ui/runs/[^/]+$"))

    # Live, without a reload: the timer node is seen running, then every node succeeds.
    expect(page.locator("#node-pause.status-running")).to_be_visible()
    expect(page.locator("#node-plan")).to_have_class(re.compile(r"\bstatus-succeeded\b"))
    shot(page, "03-run-live")
    expect(page.locator("#tokens-write")).not_to_be_empty()
    for node in ("plan", "pause", "write"):
        expect(page.locator(f"#node-{node}")).to_have_class(re.compile(r"\bstatus-succeeded\b"))
    expect(page.locator("#run-header .badge")).to_have_text("succeeded")
    expect(page.locator("#run-output")).not_to_be_empty()
    expect(page.locator("#timeline .bar")).to_have_count(3)
    # What the page streamed is exactly the node's output: nothing lost, nothing twice.
    streamed = page.locator("#tokens-write").inner_text()
    run_id = page.url.rsplit("/", 1)[1]
    run = httpx.get(f"{server.url}/runs/{run_id}").json()
    write = next(n for n in run["nodes"] if n["node"] == "write")
    assert streamed.strip() == str(write["output"]).strip()

    # A node's panel: click it in the diagram.
    page.locator("#node-write").click()
    expect(page.locator("#node-panel")).to_contain_text("write")
    expect(page.locator("#node-panel")).to_contain_text("Tokens")
    shot(page, "04-run-finished")

    # The runs page lists it.
    page.goto(f"{server.url}/")
    expect(page.locator(f"#run-{run_id} .badge")).to_have_text("succeeded")


def test_runs_page_updates_live(server: ServerProcess, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(f"{server.url}/?graph=browser-demo")
    # The page says when its live feed is connected; start the run after that.
    expect(page.locator("#runs-live[data-live=open]")).to_have_count(1)
    answer = httpx.post(f"{server.url}/graphs/browser-demo/runs", json={"input": {"topic": "wind"}})
    run_id = answer.json()["id"]
    row = page.locator(f"#run-{run_id}")
    expect(row.locator(".badge")).to_have_text("running")
    expect(page.locator("#runs-body tr").first).to_have_id(f"run-{run_id}")
    expect(row.locator(".badge")).to_have_text("succeeded")
    shot(page, "05-runs-live")


def test_cancel_a_long_run(server: ServerProcess, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    answer = httpx.post(f"{server.url}/graphs/slow/runs", json={"input": {}})
    run_id = answer.json()["id"]
    page.goto(f"{server.url}/ui/runs/{run_id}")
    expect(page.locator("#node-nap.status-running")).to_be_visible()
    page.on("dialog", lambda dialog: dialog.accept())
    page.locator("#cancel").click()
    expect(page.locator("#run-header .badge")).to_have_text("cancelled")
    expect(page.locator("#node-nap")).not_to_have_class(re.compile(r"\bstatus-running\b"))
    expect(page.locator("#cancel")).to_have_count(0)
    shot(page, "06-run-cancelled")


def test_the_run_page_rides_out_a_server_restart_without_losing_or_repeating_updates(
    tmp_path: Path, browser: object
) -> None:
    """A network blip at its worst: the server goes away mid-run and comes back (the run resumes
    there). The page's event stream reconnects by itself, resumes after the last event it had
    (Last-Event-ID), and ends with every node succeeded, one timeline bar per node, and the
    streamed text exactly the output, nothing lost and nothing twice."""
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    with running_server(tmp_path, {"BRAID_MOCK_DELAY": "0.03"}) as server:
        answer = httpx.post(
            f"{server.url}/graphs", content=DEMO, headers={"Content-Type": "application/yaml"}
        )
        assert answer.status_code == 201, answer.text
        run_id = httpx.post(
            f"{server.url}/graphs/browser-demo/runs", json={"input": {"topic": "tides"}}
        ).json()["id"]

        context = browser.new_context(viewport={"width": 1366, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/ui/runs/{run_id}")
            expect(page.locator("#node-pause.status-running")).to_be_visible()
            expect(page.locator("#node-plan")).to_have_class(re.compile(r"\bstatus-succeeded\b"))

            server.restart()  # the run is resumed by the new process, from its persisted events

            for node in ("plan", "pause", "write"):
                expect(page.locator(f"#node-{node}")).to_have_class(re.compile(r"\bstatus-succeeded\b"))
            expect(page.locator("#run-header .badge")).to_have_text("succeeded")
            expect(page.locator("#timeline .bar")).to_have_count(3)
            shot(page, "07-run-after-restart")
            run = httpx.get(f"{server.url}/runs/{run_id}").json()
            assert run["status"] == "succeeded"
            write = next(n for n in run["nodes"] if n["node"] == "write")
            assert page.locator("#tokens-write").inner_text().strip() == str(write["output"]).strip()
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            context.close()

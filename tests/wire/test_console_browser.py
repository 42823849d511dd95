"""The console in a real browser: headless Chromium (the Debian package) driven by Playwright.

A Decision session driven over gRPC appears in the list without a reload, its page highlights the
current phase and follows it through Evaluation and Voting to the resolution, another identity's
session stays invisible, a signed-out visitor sees only the sign-in form. Screenshots go to
$MACP_CONSOLE_SCREENSHOTS when set (the README's come from there), else to the test's temporary
directory. Outside CI the tests skip when Chromium or Playwright is missing; with CI=true they fail.
"""
from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.support.consolekit import DecisionSession, console_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
# Flags for a root user in a container with no network beyond loopback (nothing phones home).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
LIVE_MS = 1000   # "new sessions and state changes appear within a second"
WAIT_MS = 8000   # how long a step may take before the test fails outright (a heavily loaded machine)


def _within_a_second(seconds: float) -> None:
    """The issue's bound, asserted unless the machine is overloaded (then the waits above still bound
    the step and the figure is only reported)."""
    print(f"console update after {seconds * 1000:.0f} ms")
    if os.getloadavg()[0] <= 2 * (os.cpu_count() or 1):
        assert seconds < LIVE_MS / 1000, f"took {seconds:.2f}s"


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests need {reason} under CI (.ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package")
    if not os.path.exists(CHROMIUM):
        _unavailable("Chromium (Debian package chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path):
    out = os.environ.get("MACP_CONSOLE_SCREENSHOTS") or str(tmp_path / "screenshots")
    os.makedirs(out, exist_ok=True)
    return lambda page, name, full=True: page.screenshot(path=os.path.join(out, name + ".png"), full_page=full)


@pytest.fixture
def server(inprocess_factory):
    return console_server(inprocess_factory)


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.errors = errors
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.requests = requests
    yield pg
    context.close()


def sign_in(page, server, name: str):
    page.goto(server.console + "/")
    page.fill("#token", name)
    page.keyboard.press("Enter")
    page.wait_for_selector("#sessions")
    page.wait_for_selector("#live.on")


def current_phase(page) -> str | None:
    return page.evaluate("() => { const g = document.querySelector('#diagram g.phase.current');"
                         " return g ? g.dataset.phase : null; }")


def test_signed_out_visitor_sees_only_the_sign_in_form(browser, server, page, shots):
    s = DecisionSession(server.stub())
    s.start()
    for where in ("/", "/#/sessions", f"/#/session/{s.sid}", "/#/modes", "/#/policies"):
        page.goto(server.console + where)
        page.wait_for_selector("form.signin")
        assert page.is_hidden("#nav") and page.is_hidden("#account")
        assert page.locator("main > *").count() == 1
        assert s.sid not in page.content()
        assert page.evaluate("() => document.activeElement.id") == "token"
    assert not [u for u in page.requests if "/api/sessions" in u or "/api/events" in u]
    shots(page, "console-sign-in", full=False)
    page.fill("#token", "")
    page.goto(server.console + "/")
    page.fill("#token", "x" * 3)
    # a refused credential (static tokens) keeps the visitor on the form: see the static server below
    assert not page.errors


def test_refused_credential_stays_on_the_form(browser, inprocess_factory, page):
    import json

    srv = console_server(inprocess_factory, env={"MACP_AUTH_TOKENS_JSON": json.dumps(
        [{"token": "tok-alice", "sender": "alice"}])})
    page.goto(srv.console + "/")
    page.fill("#token", "wrong")
    page.keyboard.press("Enter")
    page.wait_for_selector("form.signin .error:has-text('refused')")
    assert page.is_hidden("#nav")
    page.fill("#token", "tok-alice")
    page.keyboard.press("Enter")
    page.wait_for_selector("#sessions")
    assert page.inner_text("#whoami") == "alice"
    # the token is never put in the address bar
    assert "tok-alice" not in page.url


def test_decision_session_live_from_list_to_resolution(browser, server, page, shots):
    sign_in(page, server, "alice")
    page.evaluate("() => { window.__noReload = true; }")
    s = DecisionSession(server.stub())
    hidden = DecisionSession(server.stub(), initiator="mallory", participants=("mallory", "trudy"))
    hidden.start()                   # another identity's session: alice must never see it
    started = time.monotonic()
    s.start()
    row = f"#sessions tr[data-session='{s.sid}']"
    page.wait_for_selector(row, timeout=WAIT_MS)
    _within_a_second(time.monotonic() - started)
    assert page.evaluate("() => window.__noReload === true")   # no reload happened
    assert page.inner_text(f"{row} td.phase") == "Proposal"
    assert "OPEN" in page.inner_text(row)
    started = time.monotonic()
    s.propose()
    page.wait_for_function(f"() => document.querySelector(\"{row} td.phase\").textContent === 'Evaluation'",
                           timeout=WAIT_MS)
    _within_a_second(time.monotonic() - started)
    assert page.locator(f"#sessions tr[data-session='{hidden.sid}']").count() == 0
    assert hidden.sid not in page.content()
    shots(page, "console-sessions", full=False)

    # keyboard: Tab to the session's link, Enter opens it
    page.focus(f"{row} a")
    page.keyboard.press("Enter")
    page.wait_for_selector("#diagram g.phase.current")
    assert current_phase(page) == "Evaluation"
    assert page.inner_text("#current-phase") == "Evaluation"
    assert page.evaluate("() => window.__noReload === true")

    s.evaluate()
    page.wait_for_selector("#history tr[data-index='2']", timeout=WAIT_MS)
    assert current_phase(page) == "Evaluation"
    started = time.monotonic()
    s.vote("alice")
    page.wait_for_function("() => document.querySelector('#current-phase').textContent === 'Voting'",
                           timeout=WAIT_MS)
    _within_a_second(time.monotonic() - started)
    assert current_phase(page) == "Voting"
    # the path taken so far, in the diagram and as text
    assert page.inner_text("#path") == "Proposal → Evaluation → Voting"
    taken = page.evaluate("() => [...document.querySelectorAll('#diagram path.edge.taken')]"
                          ".map(e => e.dataset.from + '>' + e.dataset.to)")
    assert set(taken) == {"Proposal>Evaluation", "Evaluation>Evaluation", "Evaluation>Voting"}
    visited = page.evaluate("() => [...document.querySelectorAll('#diagram g.phase.visited')].map(g => g.dataset.phase)")
    assert set(visited) == {"Proposal", "Evaluation"}
    # who has spoken
    assert "0 — has not spoken" in page.inner_text("#participants tr[data-participant='bob']")
    assert page.inner_text("#participants tr[data-participant='alice'] td:nth-child(3)") == "2"
    shots(page, "console-session-voting")

    s.vote("bob")
    s.commit()
    page.wait_for_function("() => document.querySelector('#current-phase').textContent === 'Committed'",
                           timeout=WAIT_MS)
    page.wait_for_selector("#resolution-json", timeout=WAIT_MS)
    assert current_phase(page) == "Committed"
    assert "RESOLVED" in page.inner_text("#status")
    assert "deployment.approved" in page.inner_text("#resolution-json")
    assert page.inner_text("#path") == "Proposal → Evaluation → Voting → Committed"
    assert page.locator("#history tbody tr").count() == 6
    # the phase list is the diagram's text alternative
    assert page.inner_text("#phase-list li[aria-current='step']").startswith("Committed")
    assert page.get_attribute("#diagram svg", "role") == "img"
    # decoded payloads: protobuf as JSON
    page.click("#history tr[data-index='3'] summary")
    assert '"vote": "APPROVE"' in page.inner_text("#history tr[data-index='3'] pre")
    assert "macp.modes.decision.v1.VotePayload" in page.inner_text("#history tr[data-index='3']")
    shots(page, "console-session-resolved")
    # the raw envelope of an entry, fetched with the header (the token never goes in a URL)
    page.click("#history tr[data-index='1'] a")
    page.wait_for_selector("dialog #raw-json")
    assert '"message_type": "Proposal"' in page.inner_text("#raw-json")
    page.keyboard.press("Escape")

    # back on the list the session shows RESOLVED; filters work
    page.click("#nav a[data-route='sessions']")
    page.wait_for_selector(f"{row} .state-RESOLVED")
    page.select_option("#f-state", "OPEN")
    page.wait_for_function(f"() => !document.querySelector(\"{row}\")")
    page.select_option("#f-state", "RESOLVED")
    page.wait_for_selector(row)
    page.select_option("#f-state", "")
    # another identity's session stays invisible, also by its id
    page.goto(server.console + f"/#/session/{hidden.sid}")
    page.wait_for_selector(".error-box")
    assert "No session with this id that you may read" in page.inner_text("main")
    assert not page.errors, page.errors
    assert not [u for u in page.requests if not u.startswith(server.console) and not u.startswith("data:")]


def test_keyboard_reaches_everything_and_modes_and_policies_render(browser, server, page, shots):
    sign_in(page, server, "alice")
    # after a page change the focus is on its heading; the next Tab goes into the page's content
    assert page.evaluate("() => document.activeElement.tagName") == "H1"
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "f-state"
    # backwards: the header's controls, then the navigation, then the skip link
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("() => document.activeElement.textContent") == "Sign out"
    for label in ("Policies", "Modes", "Sessions", "Skip to content"):
        page.keyboard.press("Shift+Tab")
        assert page.evaluate("() => document.activeElement.textContent") == label
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")     # "Modes"
    page.wait_for_selector(".cards .card")
    assert page.locator(".cards .card").count() >= 6
    page.click("text=Decision Mode")
    page.wait_for_selector(".doc figure.diagram svg")
    assert "Who may send what, when" in page.inner_text(".doc")
    assert "Evaluation → Voting: Vote" in page.inner_text(".doc figcaption")
    shots(page, "console-mode-decision", full=False)
    page.click("#nav a[data-route='policies']")
    page.wait_for_selector("#policies td:has-text('policy.default')")
    shots(page, "console-policies", full=False)
    assert not page.errors, page.errors

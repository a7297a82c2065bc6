"""The review page in a real headless browser (Debian's chromium through chromedriver): TOTP login, the queue, a
twin beside the real history, one approval and one rejection with a reason, checked in the database."""

from __future__ import annotations

import shutil
import threading
import time

import pyotp
import pytest
from sqlmodel import Session, select

from evoclone.federated.flower.runtime import free_port

from .conftest import MRN, NAME, PASSWORD, PHONE
from .twin_model import coordinator_key, model_dir, public_pem, signed_bundle  # noqa: F401 (fixtures)

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(DRIVER)),
                                reason="Debian chromium and chromium-driver are not installed (.ci/run installs them)")


@pytest.fixture
def served(settings, patient, model_dir, coordinator_key):
    """The site app on a real uvicorn server on loopback (real clock), with the tiny model installed."""
    import uvicorn

    from evoclone.site_node.api.main import create_app
    from evoclone.site_node.local_models import install_bundle
    from evoclone.site_node.sessions import MemoryBackend

    app = create_app(settings, sessions=MemoryBackend())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    install_bundle(engine=app.state.engine, site_dir=settings.site_dir,
                   bundle=signed_bundle(model_dir, coordinator_key, version="v1"),
                   public_key_pem=public_pem(coordinator_key))
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _user(app, name: str) -> str:
    from evoclone.site_node.auth import create_user
    from evoclone.site_node.auth_models import UserCreate

    with Session(app.state.engine) as session:
        _, secret = create_user(session=session, data=UserCreate(username=name, role="clinician", password=PASSWORD),
                                totp_key=app.state.totp_key)
        session.commit()
    return secret


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    driver.implicitly_wait(10)  # a click returns before the next page has loaded
    try:
        yield driver
    finally:
        driver.quit()


def test_log_in_review_approve_and_reject_in_a_browser(served, browser, patient):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from evoclone.site_node.review_models import TwinReview

    app, base = served
    api_secret = _user(app, "api-clinician")
    with httpx.Client(base_url=base, timeout=120) as http:
        tokens = http.post("/api/v1/auth/login", json={"username": "api-clinician", "password": PASSWORD,
                                                       "totp_code": pyotp.TOTP(api_secret).now()}).json()
        r = http.post(f"/api/v1/patients/{patient}/twins", params={"reason": "review"},
                      headers={"Authorization": f"Bearer {tokens['access_token']}"},
                      json={"arm": "treatment", "count": 4, "study": "ascvd-1"})
        assert r.status_code == 200, r.text
        ids = [t["review_id"] for t in r.json()["twins"]]
    assert len(ids) >= 2
    secret = _user(app, "dr-browser")
    browser.get(f"{base}/review")
    browser.find_element(By.ID, "username").send_keys("dr-browser")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "totp_code").send_keys(pyotp.TOTP(secret).now())  # computed here, as an app would
    browser.find_element(By.ID, "submit").click()
    assert browser.find_elements(By.ID, "queue"), browser.page_source[-1500:]
    rows = browser.find_elements(By.CSS_SELECTOR, "#queue tbody tr[data-id]")
    assert sorted(int(r.get_attribute("data-id")) for r in rows) == sorted(ids)
    browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{ids[0]}"] a.open').click()
    assert browser.find_elements(By.CSS_SELECTOR, "#timeline svg circle.real")  # the patient's real history
    assert browser.find_element(By.ID, "status").text == "pending"
    browser.find_element(By.ID, "approve").click()
    assert f"Twin {ids[0]} approved." in browser.find_element(By.ID, "message").text
    browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{ids[1]}"] a.open').click()
    Select(browser.find_element(By.ID, "reason")).select_by_value("contradicts_history")
    browser.find_element(By.ID, "text").send_keys(f"LDL jump unlike {NAME}'s history, call {PHONE}")
    browser.find_element(By.ID, "reject").click()
    assert f"Twin {ids[1]} rejected" in browser.find_element(By.ID, "message").text
    page = browser.page_source
    assert MRN not in page and NAME not in page and PHONE not in page
    with Session(app.state.engine) as session:
        rows = {r.id: r for r in session.exec(select(TwinReview)).all()}
    assert rows[ids[0]].status == "approved" and rows[ids[0]].reviewer == "dr-browser"
    assert rows[ids[1]].status == "rejected" and rows[ids[1]].reason == "contradicts_history"
    assert PHONE not in rows[ids[1]].note and "[PHONE]" in rows[ids[1]].note
    assert all(r.status == "pending" for i, r in rows.items() if i not in ids[:2])
    browser.find_element(By.ID, "logout").click()
    assert browser.find_elements(By.ID, "login")
    browser.get(f"{base}/review/twins/{ids[2]}")  # the session ended: back to the login form
    assert browser.find_elements(By.ID, "login")

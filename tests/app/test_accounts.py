"""Accounts over real HTTP: sign-up, log-in/out, sessions, CSRF, admin, rate limit."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from surge.app.security import SESSION_COOKIE
from tests.app.conftest import STORES, AppFactory, FakeClock
from tests.app.servers import Browser

NewBrowser = Callable[[], Browser]

pytestmark = STORES  # each test on SQLite and on PostgreSQL


def test_first_user_is_admin_later_ones_are_not(browsers: NewBrowser) -> None:
    a, b = browsers(), browsers()
    first = a.signup("alice")
    assert first.status_code == 201
    assert first.json()["user"]["role"] == "admin"
    assert b.signup("bob").json()["user"]["role"] == "user"
    assert browsers().signup("bob").status_code == 409  # the name is taken
    me = b.get("/api/me").json()
    assert me["user"]["username"] == "bob" and me["csrf_token"] == b.csrf


def test_cookie_is_httponly_samesite_and_hashed_at_rest(admin: Browser) -> None:
    resp = admin.login("alice")
    header = resp.headers["set-cookie"].lower()
    assert "httponly" in header and "samesite=lax" in header and "secure" not in header
    token = admin.client.cookies[SESSION_COOKIE]
    assert len(token) >= 43  # 256 random bits


def test_secure_flag_when_configured(make_app: AppFactory) -> None:
    with httpx.Client(base_url=make_app(secure_cookies=True)) as client:
        resp = client.post("/api/signup", json={"username": "alice", "password": "password123"})
    assert "secure" in resp.headers["set-cookie"].lower()


def test_login_logout_and_wrong_password(admin: Browser, browsers: NewBrowser) -> None:
    assert admin.send("POST", "/api/logout").status_code == 204
    assert admin.get("/api/me").status_code == 401
    other = browsers()
    wrong = other.login("alice", "not-the-password")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "wrong_credentials"
    assert other.login("nobody").status_code == 401  # same answer for an unknown name
    assert other.login("alice").status_code == 200
    assert other.get("/api/me").json()["user"]["username"] == "alice"


def test_logout_ends_the_session_server_side(admin: Browser, app_url: str) -> None:
    token = admin.client.cookies[SESSION_COOKIE]
    admin.send("POST", "/api/logout")
    with httpx.Client(base_url=app_url, cookies={SESSION_COOKIE: token}) as replay:
        assert replay.get("/api/me").status_code == 401


def test_new_session_id_at_each_login(admin: Browser, app_url: str) -> None:
    before = admin.client.cookies[SESSION_COOKIE]
    assert admin.login("alice").status_code == 200
    after = admin.client.cookies[SESSION_COOKIE]
    assert after != before
    with httpx.Client(base_url=app_url, cookies={SESSION_COOKIE: before}) as old:
        assert old.get("/api/me").status_code == 401  # the pre-login session is gone
    # an id planted by an attacker is never adopted
    with httpx.Client(base_url=app_url, cookies={SESSION_COOKIE: "planted"}) as victim:
        resp = victim.post("/api/login", json={"username": "alice", "password": "password123"})
        assert resp.status_code == 200
        assert resp.cookies[SESSION_COOKIE] not in ("", "planted")


def test_csrf_token_required_on_changes(admin: Browser) -> None:
    client = admin.client
    missing = client.post("/api/conversations", json={})
    assert missing.status_code == 403 and missing.json()["error"]["code"] == "csrf"
    wrong = client.post("/api/conversations", json={}, headers={"X-CSRF-Token": "x" * 43})
    assert wrong.status_code == 403
    assert client.post("/api/logout").status_code == 403
    assert admin.get("/api/me").status_code == 200  # reads need none
    assert admin.send("POST", "/api/conversations", {}).status_code == 201


def test_login_refuses_a_non_json_body(app_url: str, admin: Browser) -> None:
    with httpx.Client(base_url=app_url) as client:  # what a cross-site form could send
        resp = client.post("/api/login", data={"username": "alice", "password": "password123"})
    assert resp.status_code == 422


def test_disabled_user_is_logged_out_and_cannot_log_in(
    admin: Browser, browsers: NewBrowser
) -> None:
    bob = browsers()
    bob_id = bob.signup("bob").json()["user"]["id"]
    resp = admin.send("PATCH", f"/api/admin/users/{bob_id}", {"disabled": True})
    assert resp.status_code == 200 and resp.json()["disabled"] is True
    assert bob.get("/api/me").status_code == 401
    assert bob.login("bob").status_code == 403
    admin.send("PATCH", f"/api/admin/users/{bob_id}", {"disabled": False})
    assert bob.login("bob").status_code == 200


def test_admin_cannot_lock_themselves_out(admin: Browser) -> None:
    me = admin.get("/api/me").json()["user"]["id"]
    assert admin.send("PATCH", f"/api/admin/users/{me}", {"disabled": True}).status_code == 400
    assert admin.send("PATCH", f"/api/admin/users/{me}", {"role": "user"}).status_code == 400


def test_signup_switched_off_and_admin_adds_users(admin: Browser, browsers: NewBrowser) -> None:
    assert admin.send("PUT", "/api/admin/settings", {"signup_open": False}).status_code == 200
    outsider = browsers()
    assert outsider.get("/api/settings").json() == {"signup_open": False}
    closed = outsider.signup("carol")
    assert closed.status_code == 403 and closed.json()["error"]["code"] == "signup_closed"
    added = admin.send("POST", "/api/admin/users", {"username": "carol", "password": "s3cret-pw"})
    assert added.status_code == 201 and added.json()["role"] == "user"
    assert outsider.login("carol", "s3cret-pw").status_code == 200


def test_admin_routes_are_for_admins_only(admin: Browser, browsers: NewBrowser) -> None:
    bob = browsers()
    bob.signup("bob")
    assert bob.get("/api/admin/users").status_code == 403
    assert bob.send("PUT", "/api/admin/settings", {"signup_open": False}).status_code == 403
    users = admin.get("/api/admin/users").json()
    assert [u["username"] for u in users] == ["alice", "bob"]
    assert "password_hash" not in users[0]


def test_rate_limit_per_user(make_app: AppFactory, clock: FakeClock) -> None:
    base = make_app(max_requests_per_minute=5)
    alice, bob = Browser(base), Browser(base)
    try:
        alice.signup("alice")
        bob.signup("bob")
        for _ in range(5):
            assert alice.get("/api/me").status_code == 200
        limited = alice.get("/api/me")
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        assert bob.get("/api/me").status_code == 200  # the limit is per user
        clock.now += 12.0  # a minute's rate of 5 refills one request in 12 s
        assert alice.get("/api/me").status_code == 200
        assert alice.get("/api/me").status_code == 429
    finally:
        alice.close()
        bob.close()

"""Coordinator settings: no usable secret defaults, environment over file, cached get_settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from evoclone.coordinator.settings import CoordinatorSettings, get_settings, load_settings


def test_secret_is_required_and_not_an_example_value(tmp_path, monkeypatch):
    monkeypatch.delenv("EVOCLONE_COORDINATOR_JWT_SECRET", raising=False)
    with pytest.raises(ValidationError, match="jwt_secret"):
        CoordinatorSettings(state_dir=tmp_path)
    with pytest.raises(ValidationError, match="at least 32"):
        CoordinatorSettings(state_dir=tmp_path, jwt_secret="short")
    with pytest.raises(ValidationError, match="example value"):
        CoordinatorSettings(state_dir=tmp_path, jwt_secret="x" * 40)
    with pytest.raises(ValidationError, match="set both tls_cert and tls_key"):
        CoordinatorSettings(state_dir=tmp_path, jwt_secret="abcdefghij" * 4, tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValidationError, match="MINIO_SECRET_KEY"):
        CoordinatorSettings(state_dir=tmp_path, jwt_secret="abcdefghij" * 4, minio_endpoint="127.0.0.1:9000")


def test_defaults_file_and_environment(state_dir: Path, monkeypatch):
    s = load_settings(state_dir)
    assert s.db_url == f"sqlite:///{(state_dir / 'coordinator.db').resolve()}"
    assert (s.access_token_minutes, s.refresh_token_days, s.max_body_bytes) == (15, 7, 1 << 20)
    assert (s.suppression_min_count, s.canary_margin) == (10, 0.02)
    assert s.tls_enabled and s.superlink_db == state_dir / "flower" / "superlink-state.db"
    assert s.jwt_secret.get_secret_value() == (state_dir / "jwt.secret").read_text().strip()
    assert "jwt" not in json.loads((state_dir / "coordinator.json").read_text())
    monkeypatch.setenv("EVOCLONE_COORDINATOR_SUPERLINK_PORT", "9999")  # the file says 9093: the variable wins
    monkeypatch.setenv("EVOCLONE_COORDINATOR_ACCESS_TOKEN_MINUTES", "5")
    assert load_settings(state_dir).superlink_port == 9999 and load_settings(state_dir).access_token_minutes == 5
    monkeypatch.setenv("EVOCLONE_COORDINATOR_STATE_DIR", str(state_dir))
    get_settings.cache_clear()
    try:
        assert get_settings() is get_settings() and get_settings().state_dir == state_dir
    finally:
        get_settings.cache_clear()
    with pytest.raises(FileNotFoundError, match="evoclone coordinator init"):
        load_settings(state_dir / "missing")

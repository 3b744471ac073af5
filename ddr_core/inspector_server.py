"""The inspector served as a Streamlit ``st.App`` behind :class:`ddr_core.web_guard.WebGuard`.

``streamlit run ddr_core/inspector_server.py -- --data-root data`` (what ``ddr inspect`` and
``python -m dagster_project.launcher inspector`` run, see :func:`ddr_core.cli.inspector_command`):
Streamlit finds the ASGI app ``app`` below and serves it with uvicorn, so the guard sees every request,
the page's WebSocket (``/_stcore/stream``) and the media files: without the access token none of them
is answered, and a foreign Origin or Host is refused. The page itself is ``inspector_app.py``.

The guard settings come from ``$DDR_WEB_GUARD`` (a :class:`GuardConfig` as JSON, set by
:func:`ddr_core.cli.run_inspector`; removed from the environment once read). Without it the guard
checks Host and Origin for Streamlit's configured address and port, with no token.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware
from streamlit import config as streamlit_config

from ddr_core.web_guard import GUARD_ENV, GuardConfig, WebGuard


def guard_config() -> GuardConfig:
    """The guard of this inspector process (see the module docstring)."""
    raw = os.environ.pop(GUARD_ENV, None)
    if raw:
        return GuardConfig.model_validate_json(raw)
    return GuardConfig(bind_host=str(streamlit_config.get_option("server.address") or "127.0.0.1"),
                       port=int(streamlit_config.get_option("server.port")), service="the ddr inspector")


app = st.App(str(Path(__file__).with_name("inspector_app.py")),
             middleware=[Middleware(WebGuard, config=guard_config())])

"""The user's config directories on Hydra's search path, after rnnlab's own configs.

    RNNLAB_CONFIG_PATH=my_conf rnnlab train cell=indrnn

`UserConfigPath` is a Hydra search-path plugin that appends each directory of
``RNNLAB_CONFIG_PATH`` (`rnnlab.config.user_config_dirs`), as Hydra's own ``--config-dir`` does
with its one: a directory adds options (``cell/indrnn.yaml``), and a name rnnlab already has stays
rnnlab's. rnnlab's commands and `rnnlab.config.compose_config` register it with `register`;
Hydra's scan of the ``hydra_plugins`` namespace is not used, as an editable install cannot
offer that namespace to it.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from rnnlab.config import CONF_URL, CONFIG_PATH_VARIABLE, user_config_dirs


class UserConfigPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not any(element.path == CONF_URL for element in search_path.get_path()):
            return  # another Hydra app in this process
        for directory in user_config_dirs():
            search_path.append(provider=CONFIG_PATH_VARIABLE, path=f"file://{directory}")


def register() -> None:
    """Make Hydra apply `UserConfigPath` from now on in this process (idempotent)."""
    Plugins.instance().register(UserConfigPath)

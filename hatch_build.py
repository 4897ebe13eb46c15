"""Install `meav_merge_hook.pth` beside the package, for wheels and editable installs alike.

mergekit 0.1.5 and lm-eval 0.4.13 have no plugin discovery; the .pth file runs at
interpreter start and installs an import hook (meav_merge/_hook.py) that registers
the `meav` merge method and the `meav_*` lm-eval tasks when those libraries load.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        key = "force_include_editable" if version == "editable" else "force_include"
        build_data.setdefault(key, {})["meav_merge_hook.pth"] = "meav_merge_hook.pth"

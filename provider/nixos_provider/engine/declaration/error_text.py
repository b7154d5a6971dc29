"""Engine errors in the declaration's terms: the settings they blame named by their property paths (the CLI, which
prints errors as they are, has flags instead)."""

from __future__ import annotations

from ..errors import BuildHostError, DiskoScriptFailed, EngineError, NoNixosConfiguration, NotNixos, Setting

# Each setting an engine error can blame, as the program sets it.
PROPERTY_OF: dict[Setting, str] = {
    Setting.HOST_KEY: "`connection.hostKey`",
    Setting.PRIVATE_KEY: "`connection.privateKey`",
    Setting.PRIVATE_KEY_PASSWORD: "`connection.privateKeyPassword`",
    Setting.CREDENTIALS: "`connection.privateKey`, `connection.password` or `connection.agentSocketPath`",
    Setting.PROXY: "`connection.proxy`",
    Setting.NIXOS_ANYWHERE_COMMAND: "`install.command` or the provider's `nixosAnywhereCommand`",
    Setting.NIX_COMMAND: "`nixCommand`",
    Setting.SUDO_PASSWORD: "`connection.sudoPassword`",
}


def describe(e: BaseException) -> str:
    """The error's message, with the setting it blames named as the program's property."""
    text = str(e)
    if isinstance(e, EngineError) and e.blames is not None:
        prop = PROPERTY_OF[e.blames]
        if isinstance(e, BuildHostError):
            prop = prop.replace("`connection.", "`buildHost.")
        text = text.replace(e.blames.value, prop, 1)
    return text + _WHAT_TO_SET.get(type(e), "")


# What the program can set about an engine error that names no setting of its own.
_WHAT_TO_SET: dict[type, str] = {
    NotNixos: "; set `install` to install it with nixos-anywhere",
    NoNixosConfiguration: ": use a flake reference like `.#web` (or `.#nixosConfigurations.<name>.config.system.build."
                          "toplevel`), or set `install.diskoScript`",
    DiskoScriptFailed: " (the configuration needs disko's NixOS module for `config.system.build.diskoScript`; or set "
                       "`install.diskoScript`, or leave `disko` out of `install.phases`)",
}

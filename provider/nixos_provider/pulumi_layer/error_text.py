"""Engine errors in the Pulumi layer's terms: the settings they blame named by their property paths."""

from __future__ import annotations

from ..engine.errors import BuildHostError, EngineError, Setting

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
    return text

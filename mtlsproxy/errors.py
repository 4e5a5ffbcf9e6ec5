"""
The exceptions mtlsproxy raises, each carrying the data an operator needs.

Every start-up problem ends as one line on stderr; these classes make sure the
line names the option (or TOML key) and the file, and says what is wrong in
words that tell the operator what to fix.
"""

from __future__ import annotations


class MtlsProxyError(Exception):
    """Base class: anything mtlsproxy reports to an operator."""


class ConfigError(MtlsProxyError):
    """
    A configuration value is missing, malformed or inconsistent.

    @ivar option: the option as the operator wrote it (``--backend``), or
        C{None} when the problem is not tied to one option.
    @ivar problem: what is wrong, as a sentence fragment.
    @ivar source: where the value came from (a TOML file), if not the command line.
    """

    def __init__(self, option: str | None, problem: str, source: str | None = None) -> None:
        self.option = option
        self.problem = problem
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = f"{self.source}: "
        if self.option:
            return f"{where}{self.option}: {self.problem}"
        return f"{where}{self.problem}"


class CertificateLoadError(ConfigError):
    """
    A certificate, key, keystore, truststore or CRL file could not be used.

    @ivar path: the file that could not be used.
    """

    def __init__(self, option: str | None, path: str, problem: str) -> None:
        self.path = path
        super().__init__(option, f"{path}: {problem}")


class ListenError(MtlsProxyError):
    """The listening socket could not be opened (port in use, permission, bad fd)."""

    def __init__(self, description: str, problem: str, option: str = "--listen") -> None:
        self.description = description
        self.problem = problem
        self.option = option
        super().__init__(f"{option} {description}: {problem}")

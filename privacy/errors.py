"""The one error type users can cause.

`privacy` imports nothing else of ours, so the base class lives here and every other
package raises subclasses of it. Entry points catch `FedShieldError` and print its message
as one line (no traceback): the message must say what is wrong and where.
"""


class FedShieldError(Exception):
    """An error caused by input (config, data, keys, budgets), reported as one line."""


class BudgetExceeded(FedShieldError):
    """A site's planned spend would cross its privacy budget."""


class LedgerError(FedShieldError):
    """A privacy ledger is unreadable or fails verification."""

"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input (recipe, data, paths). Never a bug in peftkit."""

    exit_code = 2


class RecipeError(UserError):
    pass


class DataError(UserError):
    pass


class AssetMissing(UserError):
    pass


class TrainingFailed(UserError):
    """The run itself failed (e.g. non-finite loss): one line, exit code 1, not a usage error."""

    exit_code = 1

"""Stage one: run a teacher over a dataset into a cache (`build(BuildConfig(...))`)."""

from cache_builder.build import BuildResult, build
from cache_builder.config import BuildConfig

__all__ = ["BuildConfig", "BuildResult", "build"]

"""Make `+job=NAME` load jobs/NAME.yaml from the folder sdbatch runs in.

Hydra looks for a config group `job` in a `job/` folder of its search path; users keep their
jobs in `jobs/`. The `jobs://DIR` config source serves DIR as the `job` group, and the search
path plugin adds ./jobs plus every folder in SDBATCH_JOBS (os.pathsep-separated). cli.py
registers both with Hydra for sdbatch's process only.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from sdbatch.text_files import read_text

GROUP = "job"


def job_dirs() -> list[Path]:
    """The folders `+job=NAME` searches, first match wins."""
    extra = [Path(p) for p in os.environ.get("SDBATCH_JOBS", "").split(os.pathsep) if p]
    return [Path("jobs").resolve(), *(p.resolve() for p in extra)]


class JobFolderSource(ConfigSource):
    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self.folder = Path(path.split("://", 1)[-1])

    @staticmethod
    def scheme() -> str:
        return "jobs"

    def _file(self, config_path: str) -> Path | None:
        head, _, rest = config_path.partition("/")
        if head != GROUP or not rest:
            return None
        return self.folder / self._normalize_file_name(rest)

    def load_config(self, config_path: str) -> ConfigResult:
        file = self._file(config_path)
        if file is None or not file.is_file():
            raise ConfigLoadError(f"Config not found: {file}")
        text = read_text(file)  # checked before Hydra starts (cli.check_job_file)
        return ConfigResult(config=OmegaConf.create(text) if text.strip() else OmegaConf.create(),
                            path=f"{self.scheme()}://{self.folder}", provider=self.provider,
                            header=ConfigSource._get_header_dict(text[:512]))

    def available(self) -> bool:
        return self.folder.is_dir()

    def is_group(self, config_path: str) -> bool:
        if config_path in ("", GROUP):
            return self.available()
        file = self._file(config_path)
        return file is not None and file.with_suffix("").is_dir()

    def is_config(self, config_path: str) -> bool:
        file = self._file(config_path)
        return file is not None and file.is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        if config_path != GROUP or not self.available():
            return []
        files: list[str] = []
        for entry in sorted(os.listdir(self.folder)):
            self._list_add_result(files=files, file_path=f"{GROUP}/{entry}", file_name=entry,
                                  results_filter=results_filter)
        return sorted(set(files))


class JobFolders(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for folder in job_dirs():
            search_path.append("sdbatch-jobs", f"jobs://{folder}")


def register() -> None:
    from hydra.core.plugins import Plugins

    Plugins.instance().register(JobFolderSource)
    Plugins.instance().register(JobFolders)

"""The pipeline's stages, each run as `python -m stages.<name>` (dvc.yaml)."""

from lorapipe.runtime import quiet_library_notices

quiet_library_notices()

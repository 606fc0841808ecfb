"""`python tests/gcs_emulator.py start --port=P --default-bucket=B ...`

Runs PyPI's `gcp-storage-emulator` (same command line), with one fix: its
object downloads lack the `x-goog-generation` and `x-goog-metageneration`
headers that Cloud Storage sends, which TensorStore reads (orbax's OCDBT
checkpoints re-read their manifest: "Malformed StorageGeneration").
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"],
                               request.params["object_id"])
  except Exception:  # pylint: disable=broad-except  (404: nothing to add)
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = _download_with_generation  # Before the routes are built.

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())

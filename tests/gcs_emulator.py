"""`python tests/gcs_emulator.py start --port=P --default-bucket=B ...`

Runs PyPI's `gcp-storage-emulator` (same command line), with one fix: its
object downloads lack the `x-goog-generation` and `x-goog-metageneration`
headers that Cloud Storage sends, which TensorStore reads (orbax's OCDBT
checkpoints re-read their manifest: "Malformed StorageGeneration").

And one fault to inject: while the file named by the environment variable
`GCS_EMULATOR_REFUSE_WRITES_FLAG` exists, every write (upload, compose,
copy, rewrite, delete, patch) whose URL, unquoted, contains the file's
first line (an empty file: every write) is answered `403 Forbidden`, as a
bucket whose write permission was withdrawn mid-run; reads still work.
Each refused URL is appended to `<flag>.refused`.
"""

import http
import os
import sys
import urllib.parse

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

_REFUSE_FLAG = os.environ.get("GCS_EMULATOR_REFUSE_WRITES_FLAG")


def _refused_pattern():
  """The refuse-writes flag's first line, or None while there is no flag."""
  if not _REFUSE_FLAG or not os.path.exists(_REFUSE_FLAG):
    return None
  with open(_REFUSE_FLAG) as flag:
    return flag.readline().strip()


def _refusing(handler):
  """`handler`, answering 403 instead while the refuse-writes flag matches."""

  def refuse_or_handle(request, response, storage, *args, **kwargs):
    url = urllib.parse.unquote(request.full_url)
    pattern = _refused_pattern()
    if pattern is not None and pattern in url:
      with open(_REFUSE_FLAG + ".refused", "a") as refused:
        refused.write(f"{request.method} {url}\n")
      response.status = http.HTTPStatus.FORBIDDEN
      response.json({"error": {"code": 403, "message": (
          "injected fault: this bucket refuses writes"), "errors": [{
              "message": "injected fault: this bucket refuses writes",
              "domain": "global", "reason": "forbidden"}]}})
      return None
    return handler(request, response, storage, *args, **kwargs)

  return refuse_or_handle


for _name in ("insert", "upload_partial", "xml_upload", "compose", "copy",
              "rewrite", "delete", "patch"):
  setattr(objects, _name, _refusing(getattr(objects, _name)))

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())

# Sourced by the scripts: the virtual environment and the data folder.
# The data defaults to ../shared/data beside the repository when EPT_DATA_DIR is unset and that folder exists;
# without either, the pipeline falls back to the Hugging Face hub.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EPT_VENV:-$repo_root/.venv}"
if [ -z "${EPT_DATA_DIR:-}" ] && [ -d "$repo_root/../shared/data" ]; then
    EPT_DATA_DIR="$(cd "$repo_root/../shared/data" && pwd)"
    export EPT_DATA_DIR
fi

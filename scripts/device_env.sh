# Sourced by the device scripts that run the Triton kernels: installs the
# carried jax-triton wheel (.whl, see ../shared/notes/reference_numbers.md),
# points Python at it and the repo, and sets D to the embedded data's overrides.
DATA=${DATA:-.shared/data}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:. GOLF_JAX_SHARED_DATA=$DATA PYTHONUNBUFFERED=1
D="--config.data.data_dir=$DATA/tinyshakespeare_sp1024 --config.data.tokenizer_path=$DATA/tokenizers/fineweb_1024_bpe.model"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

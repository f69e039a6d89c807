# Sourced by every device script: installs the carried jax-triton wheel (.whl,
# see ../shared/notes/reference_numbers.md; carry ".whl" with ".shared"),
# points Python at it and the repo, and sets D to the embedded data's
# overrides. Without .whl the model runs the jnp MLP, as every device figure
# in docs/performance.md before the fused kernels (issue 5) did.
DATA=${DATA:-.shared/data}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:.
else
  echo "no .whl carried: jax-triton absent, the MLP runs the jnp path" >&2
  export PYTHONPATH=.
fi
# Debian packages carried in .whl (lrzip and liblzo2 for the 1.0611 record's per-group
# artifact: the image has neither), unpacked aside from / and put on the paths.
if compgen -G ".whl/*.deb" > /dev/null; then
  for f in .whl/*.deb; do dpkg -x "$f" /tmp/debroot; done
  export PATH=/tmp/debroot/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/debroot/usr/lib/x86_64-linux-gnu:/tmp/debroot/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
fi
export GOLF_JAX_SHARED_DATA=$DATA PYTHONUNBUFFERED=1
D="--config.data.data_dir=$DATA/tinyshakespeare_sp1024 --config.data.tokenizer_path=$DATA/tokenizers/fineweb_1024_bpe.model"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

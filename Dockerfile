# fastvit-reduce for GPU nodes.
#   docker build -t fastvit-reduce .
#   docker run --gpus all --ipc=host -v /data:/data fastvit-reduce \
#       torchrun --nproc_per_node=8 train.py --config rn_configs/thin.yaml \
#       --data.train_dataset=/data/train_224_0.50_90.beton --data.val_dataset=/data/val_224_0.50_90.beton \
#       --logging.folder=/data/runs
# --ipc=host: ffcv and torch use shared memory well beyond Docker's 64 MB default.
# The base image ships CUDA PyTorch and compilers (ffcv 1.0.2 is an sdist with a C extension).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/fastvit-reduce

# WHEELHOUSE: a folder in the build context made by scripts/wheelhouse.sh (e.g.
#   scripts/wheelhouse.sh --no-torch python3.11 wheelhouse; docker build --build-arg WHEELHOUSE=wheelhouse .)
# uses its auditwheel-repaired ffcv wheel: no compiler or -dev packages, no ffcv compile.
# Empty (default): the system packages are installed and ffcv is compiled from its sdist.
ARG WHEELHOUSE=""
COPY scripts/setup.sh scripts/setup.sh
COPY ${WHEELHOUSE:-scripts} /opt/wheelhouse
# System packages: the same script (and list) CI exercises, so CI tests what the image installs.
RUN if [ -z "$WHEELHOUSE" ]; then bash scripts/setup.sh --system-only && rm -rf /var/lib/apt/lists/*; fi

# The package (keeps the base image's torch: pyproject only asks torch>=2.1).
COPY pyproject.toml README.md ./
COPY fastvit_reduce fastvit_reduce
RUN if [ -n "$WHEELHOUSE" ]; then pip install --find-links /opt/wheelhouse ".[demo]"; \
    else pip install ".[demo]"; fi && python -c "import ffcv, timm, fastvit_reduce"

COPY train.py ./
COPY rn_configs rn_configs
COPY scripts scripts

CMD ["fastvit-reduce", "--help"]

# mpserve: one image for the API (`mpserve serve`) and the reconciler (`mpserve worker`).
# Multi-stage: build a virtualenv with the package, then copy it into a slim runtime as a non-root user.
#   docker build -t mpserve .                    the CPU image (the last stage, the default target)
#   docker build --target gpu -t mpserve:gpu .   tinygrad on CUDA (NVIDIA GPUs; compose profile `gpu`, deploy/k8s gpu)
# Each runtime installs its system part (clang, NVRTC) before the virtualenv is copied in, so a code change
# rebuilds only the last layers.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/mpserve
COPY pyproject.toml README.md ./
COPY marketplace ./marketplace
COPY model_store ./model_store
COPY common ./common
COPY redis_io ./redis_io
COPY server ./server
COPY worker ./worker
COPY mpserve ./mpserve
RUN /opt/mpserve/bin/pip install .

# What both images share: a non-root user, the store's volume, the environment, the API's health check.
FROM python:3.11-slim-bookworm AS runtime
RUN useradd --create-home --uid 10001 mpserve \
 && mkdir -p /data/store && chown -R mpserve /data
ENV PATH=/opt/mpserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPSERVE_STORE_DIR=/data/store \
    MPSERVE_HOST=0.0.0.0
WORKDIR /home/mpserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)" || exit 1
CMD ["mpserve", "serve"]

# The GPU image: tinygrad's CUDA backend compiles kernels with NVRTC, which comes from NVIDIA's PyPI wheel
# (no CUDA base image needed); libcuda is the host driver's, mounted by the NVIDIA container toolkit
# (`gpus: all` / the compose device reservation / nvidia.com/gpu on Kubernetes). CUDA 12's NVRTC runs on every
# driver from 525 on; set NVRTC_WHEEL to nvidia-cuda-nvrtc (CUDA 13) for drivers 580 and later.
FROM runtime AS gpu
ARG NVRTC_WHEEL=nvidia-cuda-nvrtc-cu12
RUN pip install --no-cache-dir --target /opt/nvrtc "${NVRTC_WHEEL}" \
 && lib=$(ls /opt/nvrtc/nvidia/*/lib/libnvrtc.so.* | sort | tail -1) \
 && test -n "$lib" || { echo "no libnvrtc.so in ${NVRTC_WHEEL}" >&2; exit 1; } \
 && ln -s "$lib" /opt/nvrtc/libnvrtc.so \
 && dirname "$lib" > /etc/ld.so.conf.d/nvrtc.conf && ldconfig
# tinygrad finds NVRTC by NVRTC_PATH; NVRTC loads its builtins by soname (ld.so's cache, above). The device
# plugin or the compose reservation decides which GPUs the container sees (NVIDIA's own images set "all" too).
ENV NVRTC_PATH=/opt/nvrtc/libnvrtc.so \
    MPSERVE_DEVICE=CUDA \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build /opt/mpserve /opt/mpserve
USER mpserve

# The CPU image (default target): tinygrad's CPU backend compiles its kernels at run time with clang.
FROM runtime AS cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/mpserve /opt/mpserve
USER mpserve

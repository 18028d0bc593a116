# mpserve: one image for the API (`mpserve serve`) and the reconciler (`mpserve worker`).
# Multi-stage: build a virtualenv with the package, then copy it into a slim runtime as a non-root user.
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

FROM python:3.11-slim-bookworm
# clang: tinygrad's CPU backend compiles its kernels at run time
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 mpserve \
 && mkdir -p /data/store && chown -R mpserve /data
COPY --from=build /opt/mpserve /opt/mpserve
ENV PATH=/opt/mpserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPSERVE_STORE_DIR=/data/store \
    MPSERVE_HOST=0.0.0.0
USER mpserve
WORKDIR /home/mpserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)" || exit 1
CMD ["mpserve", "serve"]

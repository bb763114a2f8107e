# FMM-TC Screen dashboard image. CPU by default; for a GPU image pass a CUDA base and variant:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_VARIANT=cu128 -t fmmtc:cuda .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FMMTC_CACHE_DIR=/var/cache/fmmtc FMMTC_DATA_DIR=/data

# CUDA base images have no Python of their own.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt pyproject.toml README.md ./
# torch first, from the wheel index of the chosen variant, at the version requirements.txt pins;
# the requirements install then finds it satisfied and pulls no other build.
RUN TORCH_PIN=$(grep -E '^torch==' requirements.txt) \
    && pip install "$TORCH_PIN" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    && pip install -r requirements.txt
COPY fmmtc_core ./fmmtc_core
COPY fmmtc_app ./fmmtc_app
COPY app.py ./
COPY views ./views
COPY assets ./assets
COPY .streamlit ./.streamlit
RUN pip install --no-deps -e . \
    && python -c "from fmmtc_core.atlas import load_atlas; load_atlas('hcpex'); load_atlas('aal3')"

EXPOSE 8501
VOLUME ["/data"]
# Inside the container the server must listen on all interfaces (0.0.0.0), or `docker run -p`
# cannot reach it; .streamlit/config.toml's loopback default is for a bare install. Decide who
# reaches it where the port is published: `docker run -p 127.0.0.1:8501:8501` keeps it on this
# computer; publishing it further needs FMMTC_PASSWORD (-e FMMTC_PASSWORD=...) and TLS in front.
CMD ["streamlit", "run", "app.py", "--server.headless", "true", "--server.address", "0.0.0.0", "--server.port", "8501"]

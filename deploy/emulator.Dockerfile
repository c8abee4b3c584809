# The AEP emulator as an image, for deploy/compose.yaml only (the production image,
# ../Dockerfile, carries no emulator). Its build context is the repository; its own ignore
# file, emulator.Dockerfile.dockerignore, lets the emulator's package in.
FROM python:3.11-slim-bookworm
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY exporter ./exporter
COPY aep_emulator ./aep_emulator
RUN python -m pip install --no-cache-dir '.[emulator]' \
    && install -d -m 0750 -o 10001 -g 10001 /data
USER 10001:10001
EXPOSE 8765
ENTRYPOINT ["aep-exporter", "emulator"]

# The loan-archive image: API server (`loan-archive serve`) and OCR worker
# (`loan-archive worker`), see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian packages the service needs at run time: Tesseract with Spanish and English for
# the OCR workers, DejaVu fonts for the analysis PDFs.
ARG SYSTEM_PACKAGES="tesseract-ocr tesseract-ocr-spa tesseract-ocr-eng fonts-dejavu-core"
RUN if [ -n "$SYSTEM_PACKAGES" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends $SYSTEM_PACKAGES \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
COPY . .
RUN pip install . \
    && useradd --system --create-home --uid 10001 archive \
    && mkdir -p /data \
    && chown archive /data

USER archive
ENV ARCHIVE_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
CMD ["loan-archive", "serve", "--host", "0.0.0.0", "--port", "8000"]

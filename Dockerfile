# The engine's image for docker-compose.yml: the `engine` command and nothing else.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY projections ./projections
RUN pip install --no-cache-dir .
ENTRYPOINT ["engine"]
CMD ["--help"]

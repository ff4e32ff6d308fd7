# spinfer serve in an empty image: one static musl binary, nothing else (no shell, no libc).
#
#   cargo build --release --target x86_64-unknown-linux-musl -p spinfer-cli --bin spinfer
#   docker build -t spinfer .            # --build-arg TARGET=aarch64-unknown-linux-musl for ARM
#   docker run --rm -p 8080:8080 -v "$PWD/.spin/ai-models:/models:ro" \
#       -e SPINFER_AUTH_TOKEN=change-me spinfer --models smollm2-135m-instruct
#
# The binary links with rust-lld alone (.cargo/config.toml), so no C toolchain is needed to
# build it; .ci/cross.sh builds both targets. Models come from a read-only volume at /models
# (Spin's registry layout: /models/llama/<name>/, /models/<embedding-model>/). Without a token
# (SPINFER_AUTH_TOKEN, or --auth-token-file on a mounted secret) the server refuses to listen
# on 0.0.0.0; pass --allow-unauthenticated only behind something that authenticates.
FROM scratch
ARG TARGET=x86_64-unknown-linux-musl
COPY target/${TARGET}/release/spinfer /spinfer
USER 65534:65534
EXPOSE 8080
VOLUME ["/models"]
ENTRYPOINT ["/spinfer", "serve", "--registry", "/models", "--listen", "0.0.0.0:8080"]

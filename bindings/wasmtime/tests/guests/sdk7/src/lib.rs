//! A Spin HTTP component on spin-sdk 7 (`wasi:http/handler@0.3.0`) that calls the LLM interface.

use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::http_service;

include!("../../common.rs");

#[http_service]
async fn handle(req: Request) -> impl IntoResponse {
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    route(&pq)
}

//! A Spin HTTP component on spin-sdk 5.2 (`wasi:http/incoming-handler@0.2.0`) that calls the
//! LLM interface.

use spin_sdk::http::{IntoResponse, Request, Response};
use spin_sdk::http_component;

include!("../../common.rs");

#[http_component]
fn handle(req: Request) -> impl IntoResponse {
    Response::new(200, route(req.path_and_query().unwrap_or("/")))
}

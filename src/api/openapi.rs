//! The OpenAPI 3.1 document served at `/openapi.json`, built from [`ROUTES`]: each
//! operation's request body (the JSON Schema of the handler's body type, derived with
//! schemars, in `components/schemas`), query and path parameters, and the content types of
//! its answers. Precise enough that a fuzzer (schemathesis, tests/fuzz_api.rs) generates
//! requests that reach the handlers instead of failing deserialization. The protobuf body
//! of `forward_backward` is documented as a JSON schema of the message's fields; real
//! clients send the protobuf, fuzzers encode that JSON (tests/fuzz/hooks.py).

use super::routes::{Body, Reply, Route, ROUTES};
use schemars::generate::SchemaSettings;
use schemars::SchemaGenerator;
use serde_json::{json, Map, Value};

/// Schema pieces for fields whose Rust type says less than the handler checks.
pub mod schema {
    use crate::train::loss::BuiltinLoss;
    use schemars::{json_schema, Schema, SchemaGenerator};
    use serde_json::{json, Value};

    /// The same schema, or null (an `Option` field).
    fn or_null(s: Schema) -> Schema {
        json_schema!({"anyOf": [s, {"type": "null"}]})
    }

    pub(crate) fn loss_fn_value() -> Value {
        let mut names: Vec<&str> = BuiltinLoss::ALL.iter().map(|l| l.name()).collect();
        names.push("custom");
        json!({
            "description": "A built-in loss, \"plugin:<id>\" for an uploaded loss plugin, or \"custom\" with loss_fn_config.plugin",
            "anyOf": [
                {"type": "string", "enum": names},
                {"type": "string", "pattern": "^plugin:[0-9a-f]{64}$"},
            ]
        })
    }

    pub fn loss_fn_or_null(_: &mut SchemaGenerator) -> Schema {
        or_null(Schema::try_from(loss_fn_value()).unwrap_or_default())
    }

    pub(crate) fn config_value() -> Value {
        json!({"anyOf": [{"type": "number"}, {"type": "string"}]})
    }

    /// A loss or sampler config: names to numbers or strings.
    pub fn config_map(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "object", "additionalProperties": config_value()})
    }

    pub fn config_map_or_null(g: &mut SchemaGenerator) -> Schema {
        or_null(config_map(g))
    }

    /// What `check_name` accepts (src/store/checkpoint.rs).
    pub(crate) const CHECKPOINT_NAME: &str = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$";
    const TINKER_PATH: &str =
        "^tinker://[^/]+/(weights|sampler_weights|external_weights)/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$";

    pub fn checkpoint_name_or_null(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": ["string", "null"], "pattern": CHECKPOINT_NAME})
    }

    pub fn checkpoint_name(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "pattern": CHECKPOINT_NAME})
    }

    /// A client's `user_metadata`: strings only, at most 16 KiB serialized.
    pub fn user_metadata(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": ["object", "null"],
            "additionalProperties": {"type": "string", "maxLength": 1024},
            "maxProperties": 8,
        })
    }

    /// `owned` (the default) or `accessible`.
    pub fn access_scope(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": ["string", "null"], "enum": ["owned", "accessible", null]})
    }

    /// `tinker://<model>/<weights|sampler_weights|external_weights>/<name>`.
    pub fn tinker_path(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "pattern": TINKER_PATH})
    }

    pub fn tinker_path_or_null(g: &mut SchemaGenerator) -> Schema {
        or_null(tinker_path(g))
    }

    /// Only AdamW is served.
    pub fn optimizer_config(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": ["object", "null"],
            "properties": {"type": {"type": "string", "enum": ["adamw"]}},
        })
    }

    /// A Tinker `ModelInput` in JSON: text chunks of token ids.
    pub fn model_input(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "required": ["chunks"],
            "properties": {"chunks": {"type": "array", "minItems": 1, "items": {
                "type": "object",
                "required": ["tokens"],
                "properties": {
                    "type": {"type": "string", "enum": ["encoded_text"]},
                    "tokens": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": u32::MAX}},
                },
            }}},
        })
    }

    /// The SDK's JSON `TensorData` of token ids (`target_prompt_logprobs`), or null.
    pub fn token_table_or_null(_: &mut SchemaGenerator) -> Schema {
        let ints = json!({"type": "array", "items": {"type": "integer", "minimum": 0}});
        json_schema!({
            "type": ["object", "null"],
            "required": ["data", "dtype", "shape"],
            "properties": {
                "data": {"type": "array", "items": {"type": "integer", "minimum": -1, "maximum": u32::MAX}},
                "dtype": {"type": "string", "enum": ["int64"]},
                "shape": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 0}},
                "sparse_crow_indices": ints,
                "sparse_col_indices": ints,
            },
        })
    }

    /// Chat conversations: at least one, each a list of messages.
    pub fn conversations(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "array",
            "minItems": 1,
            "items": {"type": "array", "maxItems": 256, "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                    "content": {"type": "string"},
                },
            }},
        })
    }

    /// `ForwardBackwardRequest` (src/api/proto.rs) as JSON: field names as in the message,
    /// byte arrays as lists of numbers, one-ofs as objects with one key.
    pub(crate) fn forward_backward_request() -> Value {
        let int64 = json!({"type": "integer", "format": "int64"});
        json!({
            "description": "The protobuf message tinker_public.ForwardBackwardRequest, its fields as JSON (fuzzers encode it; clients send the protobuf)",
            "type": "object",
            "required": ["model_id", "seq_id", "data", "loss_fn"],
            "properties": {
                "model_id": {"type": "string"},
                "seq_id": {"type": "integer", "format": "int32", "minimum": 0, "maximum": i32::MAX},
                "data": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/ProtoDatum"}},
                "loss_fn": loss_fn_value(),
                "loss_fn_config": {"type": "object", "additionalProperties": {"type": "number"}},
                "forward_only": {"type": "boolean"},
                "loss_fn_config_v2": {"type": "object", "additionalProperties": {
                    "type": "object",
                    "maxProperties": 1,
                    "properties": {"number": {"type": "number"}, "text": {"type": "string"}},
                }},
            },
            "x-components": {
                "ProtoDatum": {
                    "type": "object",
                    "required": ["model_input"],
                    "properties": {
                        "model_input": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/ProtoChunk"}},
                        "loss_fn_inputs": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/ProtoTensor"}},
                    },
                },
                "ProtoChunk": {
                    "description": "One of: encoded_text (int32 token ids), image, dmel",
                    "type": "object",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "properties": {
                        "encoded_text": {"type": "array", "minItems": 1, "items": {"type": "integer", "format": "int32", "minimum": 0, "maximum": i32::MAX}},
                        "image": {"type": "string"},
                        "dmel": {"type": "string"},
                    },
                },
                "ProtoTensor": {
                    "description": "Dense values or a sparse CSR matrix; values are encoded as dtype",
                    "type": "object",
                    "required": ["dtype", "shape"],
                    "properties": {
                        "dtype": {"type": "string", "enum": ["unspecified", "float32", "int64", "int32", "bfloat16"]},
                        "shape": {"type": "array", "items": int64},
                        "dense": {"type": "array", "items": {"type": "number"}},
                        "sparse_csr": {
                            "type": "object",
                            "required": ["crow_indices", "col_indices", "values"],
                            "properties": {
                                "crow_indices": {"type": "array", "items": int64},
                                "col_indices": {"type": "array", "items": int64},
                                "values": {"type": "array", "items": {"type": "number"}},
                            },
                        },
                    },
                },
            },
        })
    }
}

/// What the schema of a path parameter says, by route and name.
fn path_param(route: &Route, name: &str) -> Value {
    let (description, schema) = match name {
        "kind" => (
            "The checkpoint's kind",
            json!({"type": "string", "enum": ["weights", "sampler_weights", "external_weights"]}),
        ),
        "name" => (
            "The checkpoint's name",
            json!({"type": "string", "pattern": schema::CHECKPOINT_NAME}),
        ),
        "token" => (
            "A signed download token (get_external_weights_urls)",
            json!({"type": "string"}),
        ),
        "file" => (
            "A file of the PEFT adapter",
            json!({"type": "string", "enum": crate::api::tinker::download::FILES}),
        ),
        _ if route.path.starts_with("/api/v1/sessions/") => (
            "A Tinker session id (create_session)",
            json!({"type": "string"}),
        ),
        _ if route.path.starts_with("/api/v1/training_runs/") => (
            "A training run's model id (create_model)",
            json!({"type": "string"}),
        ),
        _ if route.path.starts_with("/api/v1/samplers/") => (
            "A sampling session id (create_sampling_session)",
            json!({"type": "string"}),
        ),
        _ if route.path.starts_with("/api/v1/plugins/") => (
            "A plugin id: the sha256 of its component",
            json!({"type": "string", "pattern": "^[0-9a-f]{64}$"}),
        ),
        _ => ("", json!({"type": "string"})),
    };
    json!({"name": name, "in": "path", "required": true, "description": description, "schema": schema})
}

/// Query parameters from a query struct's schema: one parameter per property.
fn query_params(route: &Route) -> Vec<Value> {
    let Some(f) = route.query else {
        return Vec::new();
    };
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let schema = f(&mut g).to_value();
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = schema["properties"].as_object() else {
        return Vec::new();
    };
    props
        .iter()
        .map(|(name, s)| {
            let mut s = s.clone();
            // An absent parameter is the `None`; a query string has no null.
            if let Some(o) = s.as_object_mut() {
                o.remove("default");
            }
            if let Some(types) = s["type"].as_array() {
                let t: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                s["type"] = if t.len() == 1 { t[0].clone() } else { Value::Array(t) };
            }
            json!({"name": name, "in": "query", "required": required.contains(&name.as_str()), "schema": s})
        })
        .collect()
}

fn request_body(route: &Route, g: &mut SchemaGenerator) -> Option<Value> {
    Some(match route.body {
        Body::None => return None,
        Body::Ignored => json!({"required": false, "content": {
            "application/json": {"schema": {"type": "object"}}}}),
        Body::Json(f) => json!({"required": true, "content": {
            "application/json": {"schema": f(g)}}}),
        Body::Protobuf => json!({"required": true, "content": {
            "application/x-protobuf": {"schema": {"$ref": "#/components/schemas/ForwardBackwardRequest"}}}}),
        Body::Wasm => json!({"required": true, "content": {
            "application/wasm": {"schema": {"type": "string", "format": "binary"}}}}),
    })
}

fn responses(route: &Route) -> Value {
    let json_ok = |d: &str| json!({"description": d, "content": {"application/json": {}}});
    let mut r = Map::new();
    r.insert(
        "200".into(),
        match route.reply {
            Reply::Json | Reply::JsonOrPending | Reply::JsonOrGone => json_ok("success"),
            Reply::JsonOrProtobuf => json!({
                "description": "the result: protobuf for forward, forward_backward and sample results; JSON otherwise (also try_again and failures)",
                "content": {"application/json": {}, "application/x-protobuf": {}},
            }),
            Reply::Tar => json!({"description": "a PEFT adapter", "content": {"application/x-tar": {}}}),
            Reply::File => json!({"description": "the file", "content": {"application/octet-stream": {}, "application/json": {}}}),
            Reply::Text => json!({"description": "Prometheus text format", "content": {"text/plain": {}}}),
        },
    );
    match route.reply {
        Reply::JsonOrPending => {
            r.insert("202".into(), json_ok("the future is still pending"));
        }
        Reply::JsonOrGone => {
            r.insert(
                "410".into(),
                json!({"description": "the session is closed", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
            );
        }
        _ => {}
    }
    r.insert(
        "4XX".into(),
        json!({"description": "the request is wrong (429: busy, retry after Retry-After)",
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
    );
    Value::Object(r)
}

/// The OpenAPI 3.1 document of [`ROUTES`].
pub fn openapi_doc() -> Value {
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let mut paths = Map::new();
    for route in ROUTES {
        let entry = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| json!({}));
        let mut params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|n| path_param(route, n))
            .collect();
        params.extend(query_params(route));
        let mut op = json!({
            "summary": route.summary,
            "parameters": params,
            "responses": responses(route),
        });
        if !route.public {
            op["security"] = json!([{"apiKey": []}]);
        }
        if let Some(b) = request_body(route, &mut g) {
            op["requestBody"] = b;
        }
        entry[route.verb.as_str()] = op;
    }
    let mut schemas = g.take_definitions(true);
    let mut fb = schema::forward_backward_request();
    if let Some(Value::Object(extra)) = fb.as_object_mut().and_then(|o| o.remove("x-components")) {
        schemas.extend(extra);
    }
    schemas.insert("ForwardBackwardRequest".into(), fb);
    schemas.insert(
        "Error".into(),
        json!({"type": "object", "properties": {
            "error": {"type": "object", "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
            "detail": {"type": "string"}}}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {"title": "loraplex", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Multi-tenant LoRA training and sampling; Tinker-compatible."},
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": schemas,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_referenced_schemas_with_their_required_fields() {
        let doc = openapi_doc();
        let body = &doc["paths"]["/api/v1/create_model"]["post"]["requestBody"];
        let r = body["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .expect("a $ref");
        let name = r.trim_start_matches("#/components/schemas/");
        let s = &doc["components"]["schemas"][name];
        let req: Vec<&str> = s["required"]
            .as_array()
            .expect("required")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for f in ["session_id", "model_seq_id", "base_model"] {
            assert!(req.contains(&f), "{f} required in {s}");
        }
        assert!(!req.contains(&"lora_config"));
        // Every $ref resolves.
        let text = doc.to_string();
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &part[..part.find('"').unwrap_or(0)];
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "dangling $ref {name}"
            );
        }
        // Paging is a query, protobuf and wasm bodies have their media types.
        let q = &doc["paths"]["/api/v1/checkpoints"]["get"]["parameters"];
        assert!(q.as_array().unwrap().iter().any(|p| p["name"] == "limit"
            && p["in"] == "query"
            && p["schema"]["type"] == "integer"));
        assert!(
            doc["paths"]["/api/v1/forward_backward"]["post"]["requestBody"]["content"]
                ["application/x-protobuf"]
                .is_object()
        );
        assert!(
            doc["paths"]["/api/v1/plugins"]["post"]["requestBody"]["content"]["application/wasm"]
                .is_object()
        );
        assert!(
            doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]["text/plain"]
                .is_object()
        );
    }
}

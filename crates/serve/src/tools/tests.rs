//! Tool-field checks, the forced-call grammar's text, and the scanner over whole and split text.

use super::*;

fn weather() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
           {"type": "function", "function": {"name": "add", "description": "a + b"}}])
}

const QWEN: &str = "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> <tool_call>{% endif %}";

fn tools(choice: Value) -> Tools {
    Tools::from_request(Some(weather()), Some(choice), None, QWEN)
        .unwrap()
        .unwrap()
}

fn param(r: Result<Option<Tools>, ServeError>) -> String {
    match r {
        Err(ServeError::BadRequest { param, .. }) => param.unwrap_or_default(),
        other => panic!("expected a 400, got {other:?}"),
    }
}

#[test]
fn bad_tool_fields_are_400s_naming_the_field() {
    let t =
        |tools: Value, choice: Value| Tools::from_request(Some(tools), Some(choice), None, QWEN);
    assert_eq!(param(t(json!({}), json!("auto"))), "tools");
    assert_eq!(
        param(t(json!([{"type": "web"}]), json!("auto"))),
        "tools[0].type"
    );
    assert_eq!(
        param(t(
            json!([{"type": "function", "function": {"name": "a b"}}]),
            json!("auto")
        )),
        "tools[0].function.name"
    );
    assert_eq!(
        param(t(
            json!([{"type": "function", "function": {"name": "a", "parameters": 3}}]),
            json!("auto")
        )),
        "tools[0].function.parameters"
    );
    assert_eq!(
        param(t(
            json!([{"type": "function", "function": {"name": "a", "paramters": {}}}]),
            json!("auto")
        )),
        "tools[0].function.paramters"
    );
    assert_eq!(param(t(weather(), json!("always"))), "tool_choice");
    assert_eq!(
        param(t(
            weather(),
            json!({"type": "function", "function": {"name": "nope"}})
        )),
        "tool_choice"
    );
    assert_eq!(param(t(json!([]), json!("required"))), "tool_choice");
    // No tools, or `none`: nothing to do.
    assert!(t(json!([]), json!("auto")).unwrap().is_none());
    assert!(t(weather(), json!("none")).unwrap().is_none());
}

#[test]
fn forced_calls_get_a_lark_grammar_and_auto_gets_none() {
    assert!(tools(json!("auto")).grammar().is_none());
    let Some(Grammar::Lark(g)) = tools(json!("required")).grammar() else {
        panic!("required needs a grammar");
    };
    assert!(g.contains("(\"\\n\" call)*"), "parallel calls allowed: {g}");
    assert!(
        g.contains("\"get_weather\"") && g.contains("\"add\""),
        "{g}"
    );
    let Some(Grammar::Lark(g)) =
        tools(json!({"type": "function", "function": {"name": "add"}})).grammar()
    else {
        panic!("a named tool needs a grammar");
    };
    assert!(!g.contains("get_weather") && !g.contains("call)*"), "{g}");
    let bare = Tools::from_request(
        Some(weather()),
        Some(json!("required")),
        None,
        "{{ tools }}",
    )
    .unwrap()
    .unwrap();
    assert_eq!(bare.format, Format::Bare);
    let Some(Grammar::Lark(g)) = bare.grammar() else {
        panic!()
    };
    assert!(
        g.starts_with("start: %json") && g.contains("\"parameters\""),
        "{g}"
    );
}

fn scan_all(t: &Tools, pieces: &[&str]) -> Vec<Piece> {
    let mut s = Scanner::new(t);
    let mut out: Vec<Piece> = pieces.iter().flat_map(|p| s.push(p)).collect();
    out.extend(s.finish());
    // Merge adjacent text pieces, as a client concatenates deltas.
    let mut merged: Vec<Piece> = vec![];
    for p in out {
        match (merged.last_mut(), p) {
            (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
            (_, p) => merged.push(p),
        }
    }
    merged
}

fn call_of(p: &Piece) -> (&str, Value) {
    match p {
        Piece::Call(c) => (
            &c.function.name,
            serde_json::from_str(&c.function.arguments).unwrap(),
        ),
        other => panic!("expected a call, got {other:?}"),
    }
}

#[test]
fn calls_are_read_whole_or_split_anywhere() {
    let t = tools(json!("auto"));
    let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 1}\"}\n</tool_call>";
    let whole = scan_all(&t, &[text]);
    // Every split point gives the same pieces.
    for cut in 1..text.len() {
        if !text.is_char_boundary(cut) {
            continue;
        }
        let split = scan_all(&t, &[&text[..cut], &text[cut..]]);
        assert_eq!(split.len(), whole.len(), "cut at {cut}");
        for (a, b) in split.iter().zip(&whole) {
            match (a, b) {
                (Piece::Text(x), Piece::Text(y)) => assert_eq!(x, y),
                (a, b) => assert_eq!(call_of(a), call_of(b)),
            }
        }
    }
    assert_eq!(whole.len(), 3, "{whole:?}");
    assert_eq!(whole[0], Piece::Text("Let me check.".into()));
    assert_eq!(
        call_of(&whole[1]),
        ("get_weather", json!({"city": "Paris"}))
    );
    assert_eq!(call_of(&whole[2]), ("add", json!({"a": 1})));
}

#[test]
fn malformed_or_undeclared_calls_stay_text_and_plain_text_passes() {
    let t = tools(json!("auto"));
    for bad in [
        "<tool_call>\n{\"name\": \"rm_rf\", \"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": \n</tool_call>",
        "<tool_call>\n{\"name\": \"add\", \"arguments\": [1]}",
    ] {
        let out = scan_all(&t, &[bad]);
        assert_eq!(out, vec![Piece::Text(bad.into())], "{bad}");
    }
    assert_eq!(
        scan_all(&t, &["Paris is ", "the capital <b>"]),
        vec![Piece::Text("Paris is the capital <b>".into())]
    );
    // An unclosed but complete call (the model stopped after the JSON) is a call.
    let out = scan_all(&t, &["<tool_call>\n{\"name\": \"add\", \"arguments\": {}}"]);
    assert_eq!(call_of(&out[0]), ("add", json!({})));
    // A bare object that is the whole output is a call (Llama 3.1 style), and text otherwise.
    let out = scan_all(
        &t,
        &[
            "  {\"name\": \"get_weather\", ",
            "\"parameters\": {\"city\": \"Oslo\"}}",
        ],
    );
    assert_eq!(call_of(&out[0]), ("get_weather", json!({"city": "Oslo"})));
    assert_eq!(
        scan_all(&t, &["{\"x\": 1}"]),
        vec![Piece::Text("{\"x\": 1}".into())]
    );
}

#[test]
fn fallback_messages_describe_tools_and_replay_history() {
    let t = Tools::from_request(Some(weather()), None, None, "{{ messages }}")
        .unwrap()
        .unwrap();
    assert!(t.fallback);
    let mut call = ChatMessage::new("assistant", "");
    call.tool_calls = vec![ToolCall {
        id: "call_1".into(),
        kind: "function".into(),
        function: FunctionCall {
            name: "get_weather".into(),
            arguments: "{\"city\":\"Paris\"}".into(),
        },
    }];
    let mut result = ChatMessage::new("tool", "18 C");
    result.tool_call_id = Some("call_1".into());
    let msgs = t.fallback_messages(vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Weather in Paris?"),
        call,
        result,
    ]);
    assert_eq!(msgs.len(), 4);
    assert!(
        msgs[0].content.starts_with("Be brief.\n\n") && msgs[0].content.contains("get_weather")
    );
    assert_eq!(
        msgs[2].content,
        "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"
    );
    assert_eq!(
        (msgs[3].role.as_str(), msgs[3].content.as_str()),
        ("user", "<tool_response>\n18 C\n</tool_response>")
    );
}

#[test]
fn a_repeated_call_ends_the_reply() {
    let t = tools(json!("required"));
    let one = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n</tool_call>\n";
    let two = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2}}\n</tool_call>\n";
    let mut s = Scanner::new(&t);
    let mut out = s.push(one);
    out.extend(s.push(two));
    assert!(!s.repeated());
    out.extend(s.push(one));
    assert!(s.repeated());
    out.extend(s.push(two));
    out.extend(s.finish());
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(call_of(&out[1]), ("add", json!({"a": 2})));
}

#[test]
fn a_strict_tools_call_under_auto_must_match_its_schema() {
    let defs = |strict: Value| {
        json!([{"type": "function", "function": {"name": "get_weather", "strict": strict,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                "days": {"type": "integer"}}, "required": ["city"],
                "additionalProperties": false}}}])
    };
    let good = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": 2}}\n</tool_call>";
    let bad = [
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": 7}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"days\": 2}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"wind\": 1}}\n</tool_call>",
    ];
    let strict = Tools::from_request(Some(defs(json!(true))), None, None, QWEN)
        .unwrap()
        .unwrap();
    let loose = Tools::from_request(Some(defs(json!(false))), None, None, QWEN)
        .unwrap()
        .unwrap();
    for t in [&strict, &loose] {
        let out = scan_all(t, &[good]);
        assert_eq!(
            call_of(&out[0]),
            ("get_weather", json!({"city": "Oslo", "days": 2}))
        );
    }
    for b in bad {
        assert_eq!(scan_all(&strict, &[b]), vec![Piece::Text(b.into())], "{b}");
        assert!(matches!(scan_all(&loose, &[b])[0], Piece::Call(_)), "{b}");
    }
    assert_eq!(
        param(Tools::from_request(
            Some(defs(json!("yes"))),
            None,
            None,
            QWEN
        )),
        "tools[0].function.strict"
    );
    // `$defs` references resolve (the definitions move to the call's root); a schema the
    // grammar engine cannot take is a 400 when the request comes, not a silent non-call.
    let with_defs = json!([{"type": "function", "function": {"name": "add", "strict": true,
        "parameters": {"type": "object", "properties": {"p": {"$ref": "#/$defs/Point"}},
                       "required": ["p"], "$defs": {"Point": {"type": "object",
                       "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}}}]);
    let t = Tools::from_request(Some(with_defs), None, None, QWEN)
        .unwrap()
        .unwrap();
    let ok = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"p\": {\"x\": 1}}}\n</tool_call>";
    assert!(matches!(scan_all(&t, &[ok])[0], Piece::Call(_)));
    let bad = ok.replace("1}", "\"one\"}");
    assert_eq!(scan_all(&t, &[&bad]), vec![Piece::Text(bad.clone())]);
    let broken = json!([{"type": "function", "function": {"name": "f", "strict": true,
        "parameters": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}}]);
    assert_eq!(
        param(Tools::from_request(Some(broken), None, None, QWEN)),
        "tools[0].function.parameters"
    );
}

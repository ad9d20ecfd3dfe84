//! The HTML policy: ammonia's allow-list (no script, no event handlers, no
//! `javascript:`), a CSS property allow-list for `style` attributes that
//! cannot load anything, and remote images held back until asked for.
//!
//! A blocked image keeps its address in `data-src` and shows a grey
//! placeholder (`data-blocked="remote"`), so the page can say "show remote
//! images" and reload with them.

use std::collections::HashSet;
use std::sync::LazyLock;

use ammonia::{Builder, UrlRelative};

/// What a blocked remote image shows instead: a small grey box.
pub const PLACEHOLDER: &str = "data:image/svg+xml,%3Csvg%20xmlns%3D%22http%3A%2F%2Fwww.w3.org%2F2000%2Fsvg%22%20width%3D%2224%22%20height%3D%2224%22%3E%3Crect%20width%3D%2224%22%20height%3D%2224%22%20fill%3D%22%23ddd%22%2F%3E%3C%2Fsvg%3E";

/// CSS properties a `style` attribute may keep. None of them takes a URL,
/// so styles can never fetch anything (no `background`, `list-style-image`,
/// `content`, `cursor`, `border-image`).
const STYLE_PROPERTIES: &[&str] = &[
    "color",
    "background-color",
    "font",
    "font-family",
    "font-size",
    "font-style",
    "font-weight",
    "font-variant",
    "line-height",
    "letter-spacing",
    "word-spacing",
    "white-space",
    "text-align",
    "text-decoration",
    "text-indent",
    "text-transform",
    "vertical-align",
    "margin",
    "margin-top",
    "margin-right",
    "margin-bottom",
    "margin-left",
    "padding",
    "padding-top",
    "padding-right",
    "padding-bottom",
    "padding-left",
    "border",
    "border-top",
    "border-right",
    "border-bottom",
    "border-left",
    "border-color",
    "border-style",
    "border-width",
    "border-collapse",
    "border-spacing",
    "border-radius",
    "width",
    "height",
    "max-width",
    "min-width",
    "max-height",
    "min-height",
    "display",
    "table-layout",
];

/// A URL scheme no message can use (ammonia drops unknown schemes before
/// our filter runs), marking an image to rewrite after serialization. The
/// random part keeps it out of anything a sender could predict.
static MARKER: LazyLock<String> =
    LazyLock::new(|| format!("x-lb-blocked-{:016x}:", rand::random::<u64>()));

/// Leading characters a browser ignores in a URL, and tab/newline which it
/// drops anywhere: what the scheme check must see through.
fn url_key(value: &str) -> String {
    value
        .trim_start_matches(|c: char| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .take(64)
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Sanitizes an HTML body for display. With `images` false, `<img>`
/// pointing anywhere but inline `data:`/`cid:` is blocked (see module docs).
/// Parses and rewrites the whole document, so it blocks: call it on the
/// blocking pool ([`crate::blocking::run`]).
pub fn clean(html: &str, images: bool) -> String {
    crate::blocking::assert_off_runtime("sanitizing a sink message's HTML");
    let marker: &'static str = MARKER.as_str();
    let mut builder = Builder::default();
    builder
        .url_schemes(HashSet::from([
            "http",
            "https",
            "mailto",
            "data",
            "cid",
            marker.trim_end_matches(':'),
        ]))
        // `//host/x` would be a remote load without a scheme.
        .url_relative(UrlRelative::Deny)
        .link_rel(Some("noopener noreferrer"))
        .add_generic_attributes(["style"])
        .filter_style_properties(STYLE_PROPERTIES.iter().copied().collect())
        .add_clean_content_tags(["title"])
        .rm_tag_attributes("img", ["srcset"])
        .attribute_filter(move |element, attribute, value| {
            let key = url_key(value);
            match (element, attribute) {
                ("img", "src") => {
                    if key.starts_with("data:image/") || key.starts_with("cid:") {
                        Some(value.into())
                    } else if key.starts_with("http:") || key.starts_with("https:") {
                        if images {
                            Some(value.into())
                        } else {
                            Some(format!("{marker}{value}").into())
                        }
                    } else {
                        None
                    }
                }
                // data: documents are no place to follow a link to.
                (_, "href") if key.starts_with("data:") || key.starts_with("cid:") => None,
                (_, _) if key.starts_with(marker) => None,
                // Allowed properties cannot load anything, but a value may
                // still carry a URL; keep such declarations out altogether.
                (_, "style") => Some(
                    value
                        .split(';')
                        .filter(|d| {
                            let d = d.to_ascii_lowercase();
                            !["url(", "image", "expression", "\\"]
                                .iter()
                                .any(|bad| d.contains(bad))
                        })
                        .collect::<Vec<_>>()
                        .join(";")
                        .into(),
                ),
                _ => Some(value.into()),
            }
        });
    let cleaned = builder.clean(html).to_string();
    // Attribute values come out with `"` escaped, so the marker can only
    // start a src value we wrote.
    cleaned.replace(
        &format!(" src=\"{marker}"),
        &format!(" src=\"{PLACEHOLDER}\" data-blocked=\"remote\" data-src=\""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_go_with_their_content() {
        assert_eq!(
            clean(
                "<p>hi</p><script>alert(1)</script><SCRIPT src=x></SCRIPT>",
                false
            ),
            "<p>hi</p>"
        );
        assert_eq!(clean("<svg><script>alert(1)</script></svg>ok", false), "ok");
        assert_eq!(
            clean(
                "<iframe src=\"https://evil\"></iframe><object data=x></object>x",
                false
            ),
            "x"
        );
    }

    #[test]
    fn event_handlers_are_dropped() {
        assert_eq!(
            clean(
                "<img src=\"data:image/png;base64,AA\" onerror=\"alert(1)\"><b onclick=alert(1) onmouseover='x'>b</b>",
                false
            ),
            "<img src=\"data:image/png;base64,AA\"><b>b</b>"
        );
    }

    #[test]
    fn javascript_and_data_links_are_dropped() {
        assert_eq!(
            clean(
                "<a href=\"javascript:alert(1)\">a</a><a href=\" JaVa\tScRiPt:alert(1)\">b</a><a href=\"data:text/html,x\">c</a>",
                false
            ),
            "<a rel=\"noopener noreferrer\">a</a><a rel=\"noopener noreferrer\">b</a><a rel=\"noopener noreferrer\">c</a>"
        );
        assert_eq!(
            clean(
                "<a href=\"https://example.org/x?a=1&amp;b=2\">ok</a>",
                false
            ),
            "<a href=\"https://example.org/x?a=1&amp;b=2\" rel=\"noopener noreferrer\">ok</a>"
        );
    }

    #[test]
    fn remote_images_are_blocked_and_restorable() {
        let html =
            "<img src=\"https://tracker.example/p.gif?u=1&amp;v=2\" alt=\"logo\" width=\"10\">";
        assert_eq!(
            clean(html, false),
            format!(
                "<img src=\"{PLACEHOLDER}\" data-blocked=\"remote\" data-src=\"https://tracker.example/p.gif?u=1&amp;v=2\" alt=\"logo\" width=\"10\">"
            )
        );
        assert_eq!(clean(html, true), html);
        // Spelled differently, still remote.
        assert!(
            clean("<img src=\" HTTP://x.example/a\">", false)
                .contains("data-src=\" HTTP://x.example/a\"")
        );
        // Scheme-relative and srcset are no way around it.
        assert_eq!(clean("<img src=\"//x.example/a\">", false), "<img>");
        assert_eq!(
            clean("<img srcset=\"https://x.example/a 1x\">", false),
            "<img>"
        );
        // Inline images stay.
        assert_eq!(
            clean("<img src=\"cid:part1@x\">", false),
            "<img src=\"cid:part1@x\">"
        );
    }

    #[test]
    fn the_marker_cannot_be_forged() {
        let forged = format!(
            "<img src=\"{}javascript:alert(1)\"><a href=\"{}x\">x</a>",
            *MARKER, *MARKER
        );
        assert_eq!(
            clean(&forged, false),
            "<img><a rel=\"noopener noreferrer\">x</a>"
        );
        // In text it is text: at worst altered, never markup.
        let text = format!("<p> src=\"{}x</p>", *MARKER);
        assert_eq!(
            clean(&text, false),
            format!("<p> src=\"{PLACEHOLDER}\" data-blocked=\"remote\" data-src=\"x</p>")
        );
    }

    #[test]
    fn styles_are_safe() {
        assert_eq!(
            clean(
                "<style>body{background:url(https://x)}</style><p>x</p>",
                false
            ),
            "<p>x</p>"
        );
        assert_eq!(
            clean(
                "<p style=\"color: red; background: url(https://t.example/x); position: fixed; font-weight: bold\">x</p>",
                false
            ),
            "<p style=\"color:red;font-weight:bold\">x</p>"
        );
        assert_eq!(
            clean(
                "<p style=\"background-color: url(https://t.example/x); behavior: url(x.htc)\">x</p>",
                false
            ),
            "<p style=\"\">x</p>"
        );
        assert_eq!(
            clean("<link rel=stylesheet href=https://x/s.css><p>x</p>", false),
            "<p>x</p>"
        );
    }

    #[test]
    fn document_chrome_is_dropped() {
        assert_eq!(
            clean(
                "<html><head><title>T</title><meta http-equiv=refresh content=\"0;url=https://x\"><base href=\"https://x/\"></head><body><p>b</p></body></html>",
                false
            ),
            "<p>b</p>"
        );
    }
}

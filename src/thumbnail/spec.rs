//! What one thumbnail should look like: size, fit, output format and options.

use serde_json::Value;

/// How the image is fitted into the `width`×`height` box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fit {
    /// Fit inside the box, keeping the aspect ratio (one side may be smaller).
    #[default]
    Contain,
    /// Fill the box, keeping the aspect ratio, cropping the centre.
    Cover,
    /// Stretch to exactly the box.
    Fill,
}

impl Fit {
    pub fn parse(s: &str) -> Option<Fit> {
        match s {
            "contain" => Some(Fit::Contain),
            "cover" => Some(Fit::Cover),
            "fill" => Some(Fit::Fill),
            _ => None,
        }
    }
}

/// An encoded image format (input or output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jpeg,
    Png,
    Webp,
    Gif,
    Tiff,
    Bmp,
}

impl Format {
    /// File extension without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Jpeg => "jpg",
            Format::Png => "png",
            Format::Webp => "webp",
            Format::Gif => "gif",
            Format::Tiff => "tiff",
            Format::Bmp => "bmp",
        }
    }

    /// MIME type for Content-Type.
    pub fn mime(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Webp => "image/webp",
            Format::Gif => "image/gif",
            Format::Tiff => "image/tiff",
            Format::Bmp => "image/bmp",
        }
    }

    /// Whether the format keeps an alpha channel (otherwise alpha is flattened).
    pub fn has_alpha(self) -> bool {
        matches!(
            self,
            Format::Png | Format::Webp | Format::Gif | Format::Tiff
        )
    }
}

/// The requested output format: a fixed one, or the same as the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Jpeg,
    Png,
    Webp,
    Gif,
    Tiff,
    Bmp,
    Same,
}

impl OutputFormat {
    pub fn parse(s: &str) -> Option<OutputFormat> {
        match s {
            "jpeg" | "jpg" => Some(OutputFormat::Jpeg),
            "png" => Some(OutputFormat::Png),
            "webp" => Some(OutputFormat::Webp),
            "gif" => Some(OutputFormat::Gif),
            "tiff" | "tif" => Some(OutputFormat::Tiff),
            "bmp" => Some(OutputFormat::Bmp),
            "same" => Some(OutputFormat::Same),
            _ => None,
        }
    }

    /// The concrete format for an input of format `input`.
    pub fn resolve(self, input: Format) -> Format {
        match self {
            OutputFormat::Jpeg => Format::Jpeg,
            OutputFormat::Png => Format::Png,
            OutputFormat::Webp => Format::Webp,
            OutputFormat::Gif => Format::Gif,
            OutputFormat::Tiff => Format::Tiff,
            OutputFormat::Bmp => Format::Bmp,
            OutputFormat::Same => input,
        }
    }
}

/// One requested thumbnail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Name of this thumbnail ([A-Za-z0-9_-], 1..=32 chars).
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub fit: Fit,
    pub format: OutputFormat,
    /// JPEG quality 1..=100.
    pub quality: u8,
    /// Progressive JPEG (with optimised Huffman tables).
    pub progressive: bool,
    /// Allow making the image larger than the source.
    pub enlarge: bool,
    /// Background for flattening alpha, sRGB.
    pub background: [u8; 3],
}

pub const MAX_SIDE: u32 = 10_000;
pub const DEFAULT_NAME: &str = "thumbnail";

impl Spec {
    /// A spec with the defaults and the given box.
    pub fn new(width: u32, height: u32) -> Spec {
        Spec {
            name: DEFAULT_NAME.to_string(),
            width,
            height,
            fit: Fit::Contain,
            format: OutputFormat::Jpeg,
            quality: 85,
            progressive: false,
            enlarge: false,
            background: [255, 255, 255],
        }
    }

    /// Parse from a JSON object; errors name the field with the prefix `thumbnail`.
    pub fn from_json(v: &Value) -> Result<Spec, String> {
        Spec::from_json_at(v, "thumbnail")
    }

    /// Parse from a JSON object; errors name the field as `{prefix}.{field}`,
    /// e.g. `thumbnails[0].width must be an integer between 1 and 10000`.
    pub fn from_json_at(v: &Value, prefix: &str) -> Result<Spec, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| format!("{prefix} must be an object"))?;
        for key in obj.keys() {
            if !matches!(
                key.as_str(),
                "name"
                    | "width"
                    | "height"
                    | "fit"
                    | "format"
                    | "quality"
                    | "progressive"
                    | "enlarge"
                    | "background"
            ) {
                return Err(format!("{prefix}.{key} is not a known field"));
            }
        }
        let name = match obj.get("name") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(format!("{prefix}.name must be a string")),
            None => return Err(format!("{prefix}.name is required")),
        };
        check_name(&name).map_err(|e| format!("{prefix}.name {e}"))?;
        let side = |field: &str| -> Result<u32, String> {
            let err = || format!("{prefix}.{field} must be an integer between 1 and {MAX_SIDE}");
            let n = obj.get(field).ok_or_else(err)?.as_u64().ok_or_else(err)?;
            if (1..=MAX_SIDE as u64).contains(&n) {
                Ok(n as u32)
            } else {
                Err(err())
            }
        };
        let mut spec = Spec::new(side("width")?, side("height")?);
        spec.name = name;
        let string = |field: &str| -> Result<Option<&str>, String> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(format!("{prefix}.{field} must be a string")),
            }
        };
        let boolean = |field: &str| -> Result<Option<bool>, String> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(format!("{prefix}.{field} must be true or false")),
            }
        };
        if let Some(s) = string("fit")? {
            spec.fit = Fit::parse(s)
                .ok_or_else(|| format!("{prefix}.fit must be one of contain, cover, fill"))?;
        }
        if let Some(s) = string("format")? {
            spec.format = OutputFormat::parse(s).ok_or_else(|| {
                format!("{prefix}.format must be one of jpeg, png, webp, gif, tiff, bmp, same")
            })?;
        }
        if let Some(q) = obj.get("quality") {
            let err = || format!("{prefix}.quality must be an integer between 1 and 100");
            let q = q.as_u64().ok_or_else(err)?;
            if !(1..=100).contains(&q) {
                return Err(err());
            }
            spec.quality = q as u8;
        }
        if let Some(b) = boolean("progressive")? {
            spec.progressive = b;
        }
        if let Some(b) = boolean("enlarge")? {
            spec.enlarge = b;
        }
        if let Some(s) = string("background")? {
            spec.background = parse_color(s)
                .ok_or_else(|| format!("{prefix}.background must be a colour like \"#rrggbb\""))?;
        }
        Ok(spec)
    }

    /// Build from query parameters (`width`, `height`, `fit`, `format`, `quality`,
    /// `progressive`, `enlarge`, `background`, optional `name`).
    pub fn from_query<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Spec, String> {
        let mut spec = Spec::new(0, 0);
        for (k, v) in pairs {
            match k {
                "name" => {
                    check_name(v).map_err(|e| format!("name {e}"))?;
                    spec.name = v.to_string();
                }
                "width" | "height" => {
                    let n = parse_side(v).ok_or_else(|| {
                        format!("{k} must be an integer between 1 and {MAX_SIDE}")
                    })?;
                    if k == "width" {
                        spec.width = n;
                    } else {
                        spec.height = n;
                    }
                }
                "fit" => {
                    spec.fit = Fit::parse(v)
                        .ok_or_else(|| "fit must be one of contain, cover, fill".to_string())?
                }
                "format" => {
                    spec.format = OutputFormat::parse(v).ok_or_else(|| {
                        "format must be one of jpeg, png, webp, gif, tiff, bmp, same".to_string()
                    })?
                }
                "quality" => {
                    spec.quality = v
                        .parse::<u8>()
                        .ok()
                        .filter(|q| (1..=100).contains(q))
                        .ok_or_else(|| "quality must be an integer between 1 and 100".to_string())?
                }
                "progressive" | "enlarge" => {
                    let b = parse_bool(v).ok_or_else(|| format!("{k} must be true or false"))?;
                    if k == "progressive" {
                        spec.progressive = b;
                    } else {
                        spec.enlarge = b;
                    }
                }
                "background" => {
                    spec.background = parse_color(v)
                        .ok_or_else(|| "background must be a colour like #rrggbb".to_string())?
                }
                other => return Err(format!("{other} is not a known parameter")),
            }
        }
        if spec.width == 0 {
            return Err(format!(
                "width is required (an integer between 1 and {MAX_SIDE})"
            ));
        }
        if spec.height == 0 {
            return Err(format!(
                "height is required (an integer between 1 and {MAX_SIDE})"
            ));
        }
        Ok(spec)
    }

    /// [`Spec::validate`], and the box against `thumbnail.max_output_pixels`.
    pub fn validate_against(&self, cfg: &super::Config) -> Result<(), String> {
        self.validate()?;
        self.check_output_pixels(cfg.max_output_pixels, "")
    }

    /// Refuse a `width` × `height` box over `max` pixels; the message starts with
    /// `prefix` (e.g. `"thumbnails[2]."`) and names both fields and the limit.
    pub fn check_output_pixels(&self, max: u64, prefix: &str) -> Result<(), String> {
        if self.width as u64 * self.height as u64 > max {
            return Err(over_pixels(prefix, self.width, self.height, max));
        }
        Ok(())
    }

    /// Check the ranges of a spec built by hand (CLI).
    pub fn validate(&self) -> Result<(), String> {
        check_name(&self.name).map_err(|e| format!("name {e}"))?;
        if !(1..=MAX_SIDE).contains(&self.width) {
            return Err(format!("width must be an integer between 1 and {MAX_SIDE}"));
        }
        if !(1..=MAX_SIDE).contains(&self.height) {
            return Err(format!(
                "height must be an integer between 1 and {MAX_SIDE}"
            ));
        }
        if !(1..=100).contains(&self.quality) {
            return Err("quality must be an integer between 1 and 100".into());
        }
        Ok(())
    }
}

/// The output-size message: `{prefix}width × height = 10000×10000 = 100000000 pixels, ...`.
fn over_pixels(prefix: &str, w: u32, h: u32, max: u64) -> String {
    format!(
        "{prefix}width × height = {w}×{h} = {} pixels, over the limit of {max} (thumbnail.max_output_pixels)",
        w as u64 * h as u64
    )
}

fn parse_side(v: &str) -> Option<u32> {
    v.parse::<u32>().ok().filter(|n| (1..=MAX_SIDE).contains(n))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 32 {
        return Err("must be 1 to 32 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err("may only contain A-Z, a-z, 0-9, _ and -");
    }
    Ok(())
}

/// Parse `#rrggbb` (the `#` is optional).
pub fn parse_color(s: &str) -> Option<[u8; 3]> {
    let hex = s.strip_prefix('#').unwrap_or(s);
    if hex.len() != 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let c = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).ok();
    Some([c(0)?, c(2)?, c(4)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_defaults_and_errors() {
        let s = Spec::from_json(&json!({"name":"small","width":100,"height":50})).unwrap();
        assert_eq!((s.width, s.height, s.quality), (100, 50, 85));
        assert_eq!(s.fit, Fit::Contain);
        assert_eq!(s.format, OutputFormat::Jpeg);
        assert_eq!(s.background, [255, 255, 255]);
        let e = Spec::from_json_at(&json!({"name":"a","width":0,"height":5}), "thumbnails[0]")
            .unwrap_err();
        assert_eq!(
            e,
            "thumbnails[0].width must be an integer between 1 and 10000"
        );
        let e = Spec::from_json(&json!({"name":"a b","width":1,"height":5})).unwrap_err();
        assert!(e.starts_with("thumbnail.name"), "{e}");
        let e = Spec::from_json(&json!({"name":"a","width":1,"height":5,"fit":"x"})).unwrap_err();
        assert!(e.starts_with("thumbnail.fit"), "{e}");
        let e =
            Spec::from_json(&json!({"name":"a","width":1,"height":5,"quality":101})).unwrap_err();
        assert!(e.starts_with("thumbnail.quality"), "{e}");
        let e = Spec::from_json(&json!({"name":"a","width":1,"height":5,"background":"red"}))
            .unwrap_err();
        assert!(e.starts_with("thumbnail.background"), "{e}");
        let s = Spec::from_json(
            &json!({"name":"a-_9","width":1,"height":5,"background":"#102030",
            "fit":"cover","format":"same","progressive":true,"enlarge":true,"quality":1}),
        )
        .unwrap();
        assert_eq!(s.background, [0x10, 0x20, 0x30]);
        assert!(s.progressive && s.enlarge);
        assert_eq!(s.format, OutputFormat::Same);
    }

    #[test]
    fn output_pixels() {
        let cfg = super::super::Config {
            max_output_pixels: 25_000_000,
            ..Default::default()
        };
        let s = Spec::from_query([("width", "10000"), ("height", "10000")]).unwrap();
        let e = s.validate_against(&cfg).unwrap_err();
        assert_eq!(
            e,
            "width × height = 10000×10000 = 100000000 pixels, over the limit of 25000000 (thumbnail.max_output_pixels)"
        );
        assert!(Spec::new(5000, 5000).validate_against(&cfg).is_ok());
        assert!(Spec::new(5000, 5001).validate_against(&cfg).is_err());
        let e = Spec::new(6000, 6000)
            .check_output_pixels(1000, "thumbnails[3].")
            .unwrap_err();
        assert!(
            e.starts_with("thumbnails[3].width × height = 6000×6000"),
            "{e}"
        );
    }

    #[test]
    fn query() {
        let s = Spec::from_query([("width", "10"), ("height", "20"), ("fit", "fill")]).unwrap();
        assert_eq!((s.width, s.height, s.fit), (10, 20, Fit::Fill));
        assert!(
            Spec::from_query([("width", "10")])
                .unwrap_err()
                .contains("height")
        );
        assert!(
            Spec::from_query([("width", "10"), ("height", "x")])
                .unwrap_err()
                .contains("height")
        );
    }
}

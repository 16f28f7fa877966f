//! The callback payload: the JSON body POSTed to the client when its job ends, the
//! reference's field for field, and the download URL it carries.

use serde::{Deserialize, Serialize};

use super::{JobRecord, ThumbnailInfo, relative_path, state};

impl JobRecord {
    /// The JSON body POSTed to the client's callback.
    pub fn callback_payload(&self, download_base: &str) -> CallbackPayload {
        let success = self.download_state == state::SUCCESS;
        CallbackPayload {
            success,
            error: self.download_error.clone(),
            extra: self.spec.extra.clone(),
            resource_url: self.spec.url.clone(),
            download_url: if success {
                download_url(download_base, &self.id)
            } else {
                String::new()
            },
            job_id: self.id.clone(),
            response_code: self.response_code,
            delivered: true,
            delivery_error: String::new(),
            image_size: self.image_size.clone(),
            // Only jobs that asked for thumbnails get the field: the reference's
            // payload stays identical for everyone else.
            thumbnails: (!self.spec.thumbnails.is_empty()).then(|| {
                self.thumbnails_made
                    .iter()
                    .map(|t| ThumbnailInfo {
                        path: format!("{}/{}", download_base.trim_end_matches('/'), t.path),
                        ..t.clone()
                    })
                    .collect()
            }),
        }
    }
}

/// `<base>/<id[0:3]>/<id>`.
pub fn download_url(base: &str, id: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), relative_path(id))
}

/// The reference's callback body, field for field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CallbackPayload {
    pub success: bool,
    pub error: String,
    pub extra: String,
    pub resource_url: String,
    pub download_url: String,
    pub job_id: String,
    pub response_code: u16,
    pub delivered: bool,
    pub delivery_error: String,
    pub image_size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnails: Option<Vec<ThumbnailInfo>>,
}

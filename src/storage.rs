//! Object storage for item images, through the `object_store` crate.
//!
//! `--object-store URL` picks the store: `file://DIR` (the default: under the
//! data directory, or a temporary one removed at exit, like the embedded
//! PostgreSQL's), `s3://BUCKET`, `gs://BUCKET` or `az://CONTAINER`.
//! Credentials come from the environment, as each cloud's builder reads it
//! (`AWS_*`, `GOOGLE_*`, `AZURE_*`); `--object-store-option KEY=VALUE` passes
//! any of the builder's own keys (e.g. `aws_endpoint=http://127.0.0.1:9000`
//! for an S3-compatible server).
//!
//! Each core opens its own client: a cloud client's connections then belong to
//! the core's runtime, as its database connections do.
//!
//! Uploads are streamed: the body goes to the store part by part as it
//! arrives, never whole. A local store takes parts of [`LOCAL_PART`]; S3
//! refuses parts under 5 MiB but the last, so a cloud upload of up to 5 MiB is
//! one part, buffered until it ends or reaches 5 MiB.

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{Attribute, Attributes, ObjectStore, PutMultipartOptions, WriteMultipart};
use url::Url;

/// The part size of uploads to a local store.
pub const LOCAL_PART: usize = 256 * 1024;
/// The part size of uploads to a cloud store: S3's smallest but the last.
pub const CLOUD_PART: usize = 5 * 1024 * 1024;
/// How long a signed URL a read redirects to stays valid.
pub const SIGNED_FOR: Duration = Duration::from_secs(300);

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("unsupported object store scheme {0}: use file://, s3://, gs:// or az://")]
    Scheme(String),
    #[error("{0} is not an absolute directory")]
    Directory(String),
    #[error("bad object store option {0}")]
    Option(String),
    #[error(transparent)]
    Store(#[from] object_store::Error),
    #[error("cannot create {0}: {1}")]
    Create(String, std::io::Error),
}

/// Where images are stored, as configured.
#[derive(Debug, Clone)]
pub struct Location {
    pub url: Url,
    /// The builder's own configuration keys and values.
    pub options: Vec<(String, String)>,
}

/// One core's client of the store.
#[derive(Debug, Clone)]
pub struct Store {
    store: Arc<dyn ObjectStore>,
    /// For stores that can sign URLs: a read redirects to one.
    signer: Option<Arc<dyn Signer>>,
    /// Whether the store keeps an object's content type (a local one does not).
    keeps_attributes: bool,
    part: usize,
}

impl Store {
    /// Opens a client of the store at `location`.
    pub fn open(location: &Location) -> Result<Store, OpenError> {
        use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
        use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
        use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};

        fn keys<K: std::str::FromStr>(options: &[(String, String)]) -> Result<Vec<(K, &str)>, OpenError> {
            options
                .iter()
                .map(|(k, v)| k.parse::<K>().map(|k| (k, v.as_str())).map_err(|_| OpenError::Option(k.clone())))
                .collect()
        }
        let url = location.url.as_str();
        let cloud = |store: Arc<dyn ObjectStore>, signer: Arc<dyn Signer>| Store {
            store,
            signer: Some(signer),
            keeps_attributes: true,
            part: CLOUD_PART,
        };
        Ok(match location.url.scheme() {
            "file" => {
                let dir = location.url.to_file_path().map_err(|_| OpenError::Directory(location.url.to_string()))?;
                std::fs::create_dir_all(&dir).map_err(|e| OpenError::Create(dir.display().to_string(), e))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)?.with_automatic_cleanup(true);
                Store { store: Arc::new(local), signer: None, keeps_attributes: false, part: LOCAL_PART }
            }
            "s3" | "s3a" => {
                let mut builder = AmazonS3Builder::from_env().with_url(url);
                for (key, value) in keys::<AmazonS3ConfigKey>(&location.options)? {
                    builder = builder.with_config(key, value);
                }
                let s3 = Arc::new(builder.build()?);
                cloud(s3.clone(), s3)
            }
            "gs" => {
                let mut builder = GoogleCloudStorageBuilder::from_env().with_url(url);
                for (key, value) in keys::<GoogleConfigKey>(&location.options)? {
                    builder = builder.with_config(key, value);
                }
                let gcs = Arc::new(builder.build()?);
                cloud(gcs.clone(), gcs)
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let mut builder = MicrosoftAzureBuilder::from_env().with_url(url);
                for (key, value) in keys::<AzureConfigKey>(&location.options)? {
                    builder = builder.with_config(key, value);
                }
                let azure = Arc::new(builder.build()?);
                cloud(azure.clone(), azure)
            }
            other => return Err(OpenError::Scheme(other.to_owned())),
        })
    }

    /// Starts an upload of an object of `content_type` to `key`. Nothing is at
    /// `key` until [`Upload::finish`]; an upload dropped before is aborted.
    pub async fn upload(&self, key: &Path, content_type: &'static str) -> object_store::Result<Upload> {
        let mut options = PutMultipartOptions::default();
        if self.keeps_attributes {
            options.attributes = Attributes::from_iter([(Attribute::ContentType, content_type)]);
        }
        let upload = self.store.put_multipart_opts(key, options).await?;
        Ok(Upload(Some(WriteMultipart::new_with_chunk_size(upload, self.part))))
    }

    /// The object at `key`, as a stream of its bytes.
    pub async fn read(&self, key: &Path) -> object_store::Result<object_store::GetResult> {
        self.store.get_opts(key, object_store::GetOptions::default()).await
    }

    /// A URL that reads the object at `key` for [`SIGNED_FOR`], if the store
    /// can sign one.
    pub async fn signed_url(&self, key: &Path) -> Option<Url> {
        let signer = self.signer.as_ref()?;
        match signer.signed_url(object_store::signer::Method::GET, key, SIGNED_FOR).await {
            Ok(url) => Some(url),
            Err(e) => {
                tracing::debug!(error = %e, "cannot sign a URL; streaming the image instead");
                None
            }
        }
    }

    /// Deletes the object at `key`, which no row names any more; a failure is
    /// logged (the object is left behind), since the caller's outcome stands.
    pub async fn discard(&self, key: &Path) {
        if let Err(e) = self.delete(key).await {
            tracing::warn!(error = %e, %key, "cannot delete an image object no row names");
        }
    }

    /// Deletes the object at `key`; one already gone is no error.
    pub async fn delete(&self, key: &Path) -> object_store::Result<()> {
        use object_store::ObjectStoreExt;
        match self.store.delete(key).await {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }
}

/// An upload under way: bytes go to the store in parts as they come.
pub struct Upload(Option<WriteMultipart>);

impl Upload {
    /// Adds `bytes`, waiting while a part is on its way to the store.
    pub async fn write(&mut self, bytes: bytes::Bytes) -> object_store::Result<()> {
        let writer = self.0.as_mut().expect("an upload is written only before it finishes");
        writer.wait_for_capacity(1).await?;
        writer.put(bytes);
        Ok(())
    }

    /// Completes the upload: the object is now at its key.
    pub async fn finish(mut self) -> object_store::Result<()> {
        let writer = self.0.take().expect("an upload finishes once");
        writer.finish().await.map(drop)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(writer) = self.0.take() {
            // Unfinished (bad bytes, too large, the client gone): the parts sent
            // so far are thrown away, and nothing appears at the key.
            tokio::spawn(async move {
                if let Err(e) = writer.abort().await {
                    tracing::debug!(error = %e, "aborting an image upload failed");
                }
            });
        }
    }
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upload(..)")
    }
}

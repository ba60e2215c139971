//! Item images: uploads to the store as they arrive, reads, replacements and
//! deletions; every bad upload; a local store and a real S3-compatible one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, assert_problem, eventually, fresh_connection_client, spawn_app_with};

/// A PNG's signature and then `len - 8` more bytes: gavel checks the signature.
fn png(len: usize) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend((0..len.saturating_sub(8)).map(|i| (i % 251) as u8));
    bytes
}

/// A JPEG's signature and then filler, `len` bytes in all.
fn jpeg(len: usize) -> Vec<u8> {
    let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0];
    bytes.extend((0..len.saturating_sub(4)).map(|i| (i % 13) as u8));
    bytes
}

impl TestApp {
    fn image_url(&self, auction: i64, name: &str) -> String {
        self.url(&format!("/api/auctions/{auction}/images/{name}"))
    }

    /// On a connection of its own: a refused upload's connection is closed
    /// with its body unread, and a pooled one could be reused as it closes.
    async fn upload(
        &self,
        token: &str,
        auction: i64,
        name: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> reqwest::Response {
        fresh_connection_client()
            .put(self.image_url(auction, name))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    async fn delete_image(&self, token: &str, auction: i64, name: &str) -> reqwest::Response {
        self.client.delete(self.image_url(auction, name)).bearer_auth(token).send().await.unwrap()
    }

    /// The auction's `images` once every core shows `expected`.
    async fn images_everywhere(&self, auction: i64, expected: &[&str]) {
        let path = format!("/api/auctions/{auction}");
        eventually(Duration::from_secs(5), "every core lists the images", || async {
            let reads = self.read_on_every_core(&path, "/api/auctions/{id}").await;
            reads.iter().all(|a| a["images"] == serde_json::json!(expected)).then_some(())
        })
        .await;
    }

    async fn image_rows(&self) -> i64 {
        sqlx::query_scalar("select count(*) from auction_images").fetch_one(&self.db).await.unwrap()
    }
}

/// Every file under `dir`, staging files included.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                found.push(entry.path());
            }
        }
    }
    found
}

/// A server storing images in a directory the test can look into.
async fn with_local_store(extra: &[&str]) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = url::Url::from_directory_path(dir.path()).unwrap().to_string();
    let mut flags = vec!["--object-store", url.as_str()];
    flags.extend_from_slice(extra);
    (spawn_app_with(&flags).await, dir)
}

/// Upload, read, list, conditional read, replace and delete, against `app`'s
/// local store in `dir`.
async fn round_trip(app: &TestApp, dir: &Path) {
    let objects = || files(dir).len();
    let seller = app.seller();
    let auction = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let first = png(3000);
    let stored = app.upload(&seller, auction, "front.png", "image/png", first.clone()).await;
    assert_eq!(stored.status(), StatusCode::CREATED);
    assert_eq!(stored.headers()["location"], format!("/api/auctions/{auction}/images/front.png"));
    let stored: Value = stored.json().await.unwrap();
    assert_eq!((stored["name"].as_str(), stored["size"].as_u64()), (Some("front.png"), Some(3000)));
    assert_eq!(stored["content_type"], "image/png");

    let read = app.client.get(app.image_url(auction, "front.png")).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(read.headers()["content-type"], "image/png");
    let etag = read.headers().get("etag").cloned();
    assert_eq!(read.bytes().await.unwrap(), first);
    app.images_everywhere(auction, &["front.png"]).await;
    let etag = etag.expect("an ETag");
    let again = app.client.get(app.image_url(auction, "front.png")).header("if-none-match", etag).send().await;
    assert_eq!(again.unwrap().status(), StatusCode::NOT_MODIFIED);
    assert_eq!(objects(), 1);

    let second = jpeg(2000);
    let replaced = app.upload(&seller, auction, "front.png", "image/jpeg", second.clone()).await;
    assert_eq!(replaced.status(), StatusCode::OK, "a replacement");
    let read = app.client.get(app.image_url(auction, "front.png")).send().await.unwrap();
    assert_eq!(read.headers()["content-type"], "image/jpeg");
    assert_eq!(read.bytes().await.unwrap(), second);
    assert_eq!(objects(), 1, "the replaced object is gone");
    assert_eq!(app.upload(&seller, auction, "back.png", "image/png", png(100)).await.status(), StatusCode::CREATED);
    app.images_everywhere(auction, &["back.png", "front.png"]).await;

    let others = app.delete_image(&app.seller_as(2), auction, "front.png").await;
    assert_problem(others, StatusCode::FORBIDDEN, "/problems/forbidden").await;
    assert_eq!(app.delete_image(&seller, auction, "front.png").await.status(), StatusCode::NO_CONTENT);
    let twice = app.delete_image(&seller, auction, "front.png").await;
    assert_problem(twice, StatusCode::NOT_FOUND, "/problems/not-found").await;
    let gone = app.client.get(app.image_url(auction, "front.png")).send().await.unwrap();
    assert_problem(gone, StatusCode::NOT_FOUND, "/problems/not-found").await;
    app.images_everywhere(auction, &["back.png"]).await;
    assert_eq!(objects(), 1);
    assert_eq!(app.image_rows().await, 1);
}

#[tokio::test]
async fn images_round_trip_through_a_local_store() {
    let (app, dir) = with_local_store(&[]).await;
    round_trip(&app, dir.path()).await;
}

/// Every bad upload gets its problem, and leaves no object and no row.
#[tokio::test]
async fn bad_uploads_get_their_problem_and_leave_nothing_behind() {
    let (app, dir) = with_local_store(&["--image-max-bytes", "10000"]).await;
    let (seller, other) = (app.seller(), app.seller_as(2));
    let auction = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let upload = |token: String, name: &'static str, content_type: &'static str, bytes: Vec<u8>| {
        let app = &app;
        async move { app.upload(&token, auction, name, content_type, bytes).await }
    };
    let problems = [
        (
            upload(seller.clone(), "a.gif", "image/gif", png(100)).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "/problems/unsupported-image",
        ),
        (
            upload(seller.clone(), "a.png", "image/png", jpeg(100)).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "/problems/unsupported-image",
        ),
        (
            upload(seller.clone(), "a.png", "image/png", b"<svg/>".to_vec()).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "/problems/unsupported-image",
        ),
        (
            upload(seller.clone(), "a.png", "image/png", png(10001)).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "/problems/payload-too-large",
        ),
        (upload(other.clone(), "a.png", "image/png", png(100)).await, StatusCode::FORBIDDEN, "/problems/forbidden"),
        (upload(app.bidder(5), "a.png", "image/png", png(100)).await, StatusCode::FORBIDDEN, "/problems/forbidden"),
        (
            upload(seller.clone(), ".hidden", "image/png", png(100)).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "/problems/validation",
        ),
    ];
    for (response, status, kind) in problems {
        assert_problem(response, status, kind).await;
    }
    let unknown = app.upload(&seller, 999_999, "a.png", "image/png", png(100)).await;
    assert_problem(unknown, StatusCode::NOT_FOUND, "/problems/not-found").await;
    for url in [app.url("/api/auctions/abc/images/a.png"), app.url("/api/auctions/0/images/a.png")] {
        let put =
            fresh_connection_client().put(&url).bearer_auth(&seller).header("content-type", "image/png").body(png(100));
        assert_problem(put.send().await.unwrap(), StatusCode::NOT_FOUND, "/problems/not-found").await;
        let get = fresh_connection_client().get(&url).send().await.unwrap();
        assert_problem(get, StatusCode::NOT_FOUND, "/problems/not-found").await;
    }
    let anonymous = fresh_connection_client()
        .put(app.image_url(auction, "a.png"))
        .header("content-type", "image/png")
        .body(png(100));
    assert_problem(anonymous.send().await.unwrap(), StatusCode::UNAUTHORIZED, "/problems/unauthorized").await;

    // Too large without a Content-Length: found while streaming, and aborted.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..5).map(|_| Ok(png(4000))).collect();
    let streamed = fresh_connection_client()
        .put(app.image_url(auction, "big.png"))
        .bearer_auth(&seller)
        .header("content-type", "image/png")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_problem(streamed, StatusCode::PAYLOAD_TOO_LARGE, "/problems/payload-too-large").await;

    assert_eq!(app.image_rows().await, 0);
    eventually(Duration::from_secs(5), "no object or staging file is left", || async {
        files(dir.path()).is_empty().then_some(())
    })
    .await;
    let read = fresh_connection_client().get(app.image_url(auction, "a.png")).send().await.unwrap();
    assert_problem(read, StatusCode::NOT_FOUND, "/problems/not-found").await;
}

/// An auction takes ten images; an eleventh is refused, a replacement is not.
#[tokio::test]
async fn an_auction_takes_ten_images() {
    let (app, dir) = with_local_store(&[]).await;
    let seller = app.seller();
    let auction = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    for i in 0..10 {
        let name = format!("{i}.png");
        let response = app.upload(&seller, auction, &name, "image/png", png(64)).await;
        assert_eq!(response.status(), StatusCode::CREATED, "{name}");
    }
    let eleventh = app.upload(&seller, auction, "10.png", "image/png", png(64)).await;
    assert_problem(eleventh, StatusCode::CONFLICT, "/problems/too-many-images").await;
    assert_eq!(app.upload(&seller, auction, "3.png", "image/png", png(80)).await.status(), StatusCode::OK);
    assert_eq!(app.image_rows().await, 10);
    eventually(Duration::from_secs(5), "ten objects", || async { (files(dir.path()).len() == 10).then_some(()) }).await;
}

/// A client that goes away mid-upload leaves no object and no row.
#[tokio::test]
async fn a_client_gone_mid_upload_leaves_nothing_behind() {
    use tokio::io::AsyncWriteExt;
    let (app, dir) = with_local_store(&[]).await;
    let auction = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "PUT /api/auctions/{auction}/images/half.png HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: image/png\r\ncontent-length: 2000000\r\n\r\n",
        app.seller()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&png(1_000_000)).await.unwrap();
    eventually(Duration::from_secs(5), "the upload reached the store", || async {
        (!files(dir.path()).is_empty()).then_some(())
    })
    .await;
    drop(stream);
    eventually(Duration::from_secs(5), "the half upload is gone", || async {
        files(dir.path()).is_empty().then_some(())
    })
    .await;
    assert_eq!(app.image_rows().await, 0);
}

/// An image larger than one part of the store goes through whole.
#[tokio::test]
async fn a_large_image_is_stored_and_read_back_whole() {
    let (app, _dir) = with_local_store(&[]).await;
    let auction = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let big = jpeg(5 * 1024 * 1024);
    let stored = app.upload(&app.seller(), auction, "big.jpg", "image/jpeg", big.clone()).await;
    assert_eq!(stored.status(), StatusCode::CREATED);
    let read = app.client.get(app.image_url(auction, "big.jpg")).send().await.unwrap();
    assert_eq!(read.headers()["content-length"], (5 * 1024 * 1024).to_string());
    assert!(read.bytes().await.unwrap() == big, "the bytes read are the bytes stored");
}

/// moto's S3 server, on a port of its own, for one test.
struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts moto's server (`MOTO_SERVER`, else `moto_server` on the PATH; `.ci/run`
/// installs it) and creates `bucket`.
async fn moto(bucket: &str) -> Moto {
    let program = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(&program)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} (moto's S3 server; see .ci/run): {e}"));
    let moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}") };
    let client = reqwest::Client::new();
    let bucket_url = format!("{}/{bucket}", moto.endpoint);
    eventually(Duration::from_secs(30), "moto answers", || async {
        client.put(&bucket_url).send().await.ok().filter(|r| r.status().is_success()).map(drop)
    })
    .await;
    moto
}

/// The same round trip against a real S3-compatible server: reads redirect to
/// the store's signed URLs.
#[tokio::test]
async fn images_round_trip_through_s3() {
    let moto = moto("gavel-images").await;
    let endpoint = format!("aws_endpoint={}", moto.endpoint);
    let app = spawn_app_with(&[
        "--object-store",
        "s3://gavel-images",
        "--object-store-option",
        &endpoint,
        "--object-store-option",
        "aws_allow_http=true",
        "--object-store-option",
        "aws_access_key_id=test",
        "--object-store-option",
        "aws_secret_access_key=test",
        "--object-store-option",
        "aws_region=us-east-1",
    ])
    .await;
    let auction = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    assert_eq!(
        app.upload(&app.seller(), auction, "probe.png", "image/png", png(10)).await.status(),
        StatusCode::CREATED
    );
    let read = no_redirects.get(app.image_url(auction, "probe.png")).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = read.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&moto.endpoint) && location.contains("X-Amz-Signature"), "{location}");
    assert_eq!(app.delete_image(&app.seller(), auction, "probe.png").await.status(), StatusCode::NO_CONTENT);

    let listed = || async {
        let listing = reqwest::get(format!("{}/gavel-images?list-type=2", moto.endpoint)).await.unwrap();
        Some(listing.text().await.unwrap().matches("<Key>").count())
    };
    round_trip_s3(&app, listed).await;
}

async fn round_trip_s3<F, Fut>(app: &TestApp, objects: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<usize>>,
{
    let seller = app.seller();
    let auction = app.open_auction(100, 10, 60.0, 0).await["id"].as_i64().unwrap();
    let first = png(3000);
    assert_eq!(
        app.upload(&seller, auction, "front.png", "image/png", first.clone()).await.status(),
        StatusCode::CREATED
    );
    let read = app.client.get(app.image_url(auction, "front.png")).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::OK, "followed to the store");
    assert_eq!(read.headers()["content-type"], "image/png", "the store keeps the type");
    assert_eq!(read.bytes().await.unwrap(), first);
    assert_eq!(objects().await, Some(1));
    let second = jpeg(2000);
    assert_eq!(app.upload(&seller, auction, "front.png", "image/jpeg", second.clone()).await.status(), StatusCode::OK);
    let read = app.client.get(app.image_url(auction, "front.png")).send().await.unwrap();
    assert_eq!(read.bytes().await.unwrap(), second);
    assert_eq!(objects().await, Some(1), "the replaced object is gone");
    let bad = app.upload(&seller, auction, "bad.png", "image/png", jpeg(100)).await;
    assert_problem(bad, StatusCode::UNSUPPORTED_MEDIA_TYPE, "/problems/unsupported-image").await;
    assert_eq!(app.delete_image(&seller, auction, "front.png").await.status(), StatusCode::NO_CONTENT);
    assert_eq!(objects().await, Some(0));
    app.images_everywhere(auction, &[]).await;
}

// Package s3 is the export Sink on S3 (aws-sdk-go-v2): each part file is an
// object written by multipart upload in parts of the job's uploadPartSize,
// and clients download objects through presigned HTTPS URLs or, for Helix
// clients with their own AWS credentials, s3://bucket/key.
package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	awss3 "github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/kiln-fhir/kiln"
)

const contentType = "application/fhir+ndjson"

// MinPartSize is S3's smallest part (all but the last).
const MinPartSize = 5 << 20

// Config says where export files go.
type Config struct {
	Bucket string
	// Prefix is prepended to every key (no leading or trailing slash needed).
	Prefix string
	// Endpoint, if set, replaces AWS's (versitygw, MinIO, …); PathStyle puts
	// the bucket in the path rather than the host name.
	Endpoint  string
	PathStyle bool
	Region    string
	// URLStyle is "presigned" (default) or "s3" (s3://bucket/key, Helix's form).
	URLStyle string
	// URLExpiry is the lifetime of presigned URLs (default 1 h).
	URLExpiry time.Duration
	// HTTPClient, if set, is used for S3 requests (tests inject faults with it).
	HTTPClient aws.HTTPClient
}

// Sink writes export files to S3.
type Sink struct {
	cfg     Config
	client  *awss3.Client
	presign *awss3.PresignClient
}

// New returns a Sink. Credentials come from the standard AWS chain
// (environment, shared files, instance role).
func New(ctx context.Context, cfg Config) (*Sink, error) {
	if cfg.Bucket == "" {
		return nil, errors.New("s3: a bucket is required")
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	if cfg.URLExpiry <= 0 {
		cfg.URLExpiry = time.Hour
	}
	switch cfg.URLStyle {
	case "":
		cfg.URLStyle = "presigned"
	case "presigned", "s3":
	default:
		return nil, fmt.Errorf("s3: URL style %q: use presigned or s3", cfg.URLStyle)
	}
	cfg.Prefix = strings.Trim(cfg.Prefix, "/")
	ac, err := config.LoadDefaultConfig(ctx, config.WithRegion(cfg.Region))
	if err != nil {
		return nil, fmt.Errorf("s3: load AWS configuration: %w", err)
	}
	client := awss3.NewFromConfig(ac, func(o *awss3.Options) {
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
		}
		o.UsePathStyle = cfg.PathStyle
		if cfg.HTTPClient != nil {
			o.HTTPClient = cfg.HTTPClient
		}
		// Checksums only where S3 requires them: S3-compatible servers differ in what they accept.
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
	})
	return &Sink{cfg: cfg, client: client, presign: awss3.NewPresignClient(client)}, nil
}

// Client is the underlying S3 client.
func (s *Sink) Client() *awss3.Client { return s.client }

// Key is the object key of a job's file. Job ids are random UUIDs, so keys
// cannot be guessed from a tenant or client name.
func (s *Sink) Key(job, name string) string {
	return path.Join(s.cfg.Prefix, job, name)
}

func (s *Sink) jobPrefix(job string) string { return path.Join(s.cfg.Prefix, job) + "/" }

func validName(job, name string) bool {
	return job != "" && name != "" && !strings.ContainsAny(job+name, `/\`) && job != ".." && name != ".."
}

// Create implements kiln.Sink.
func (s *Sink) Create(ctx context.Context, job, name string, opt kiln.WriteOptions) (io.WriteCloser, error) {
	if !validName(job, name) {
		return nil, fmt.Errorf("s3: bad file name %q/%q", job, name)
	}
	size := opt.PartSize
	if size < MinPartSize {
		size = MinPartSize
	}
	return &upload{ctx: ctx, s: s, key: s.Key(job, name), partSize: size, buf: make([]byte, 0, size+64<<10)}, nil
}

// Open implements kiln.Sink.
func (s *Sink) Open(ctx context.Context, job, name string) (io.ReadCloser, error) {
	if !validName(job, name) {
		return nil, kiln.Errorf(kiln.ENOTFOUND, "no such file")
	}
	out, err := s.client.GetObject(ctx, &awss3.GetObjectInput{Bucket: &s.cfg.Bucket, Key: aws.String(s.Key(job, name))})
	if err != nil {
		var nk *types.NoSuchKey
		if errors.As(err, &nk) {
			return nil, kiln.Errorf(kiln.ENOTFOUND, "file %s of job %s is gone", name, job)
		}
		return nil, fmt.Errorf("s3: get %s: %w", name, err)
	}
	return out.Body, nil
}

// URL implements kiln.URLSink.
func (s *Sink) URL(ctx context.Context, job, name string) (string, error) {
	key := s.Key(job, name)
	if s.cfg.URLStyle == "s3" {
		return "s3://" + s.cfg.Bucket + "/" + key, nil
	}
	req, err := s.presign.PresignGetObject(ctx, &awss3.GetObjectInput{Bucket: &s.cfg.Bucket, Key: &key},
		awss3.WithPresignExpires(s.cfg.URLExpiry))
	if err != nil {
		return "", fmt.Errorf("s3: presign %s: %w", key, err)
	}
	return req.URL, nil
}

// RequiresAccessToken is false: presigned URLs are capability URLs, and s3://
// URLs are read with the client's own AWS credentials.
func (s *Sink) RequiresAccessToken() bool { return false }

// RemovePrefix implements kiln.Sink: objects and unfinished multipart uploads.
func (s *Sink) RemovePrefix(ctx context.Context, job, prefix string) error {
	return s.removeKeys(ctx, s.jobPrefix(job)+prefix)
}

// RemoveJob implements kiln.Sink.
func (s *Sink) RemoveJob(ctx context.Context, job string) error {
	if job == "" || strings.ContainsAny(job, `/\`) {
		return nil
	}
	return s.removeKeys(ctx, s.jobPrefix(job))
}

func (s *Sink) removeKeys(ctx context.Context, prefix string) error {
	if err := s.AbortUploads(ctx, prefix); err != nil {
		return err
	}
	p := awss3.NewListObjectsV2Paginator(s.client, &awss3.ListObjectsV2Input{Bucket: &s.cfg.Bucket, Prefix: &prefix})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return fmt.Errorf("s3: list %s: %w", prefix, err)
		}
		for _, o := range page.Contents {
			if _, err := s.client.DeleteObject(ctx, &awss3.DeleteObjectInput{Bucket: &s.cfg.Bucket, Key: o.Key}); err != nil {
				return fmt.Errorf("s3: delete %s: %w", aws.ToString(o.Key), err)
			}
		}
	}
	return nil
}

// AbortUploads aborts the unfinished multipart uploads under prefix.
func (s *Sink) AbortUploads(ctx context.Context, prefix string) error {
	uploads, err := s.Uploads(ctx, prefix)
	if err != nil {
		return err
	}
	for _, u := range uploads {
		if _, err := s.client.AbortMultipartUpload(ctx, &awss3.AbortMultipartUploadInput{Bucket: &s.cfg.Bucket, Key: u.Key, UploadId: u.UploadId}); err != nil {
			return fmt.Errorf("s3: abort upload of %s: %w", aws.ToString(u.Key), err)
		}
	}
	return nil
}

// Uploads lists unfinished multipart uploads under prefix.
func (s *Sink) Uploads(ctx context.Context, prefix string) ([]types.MultipartUpload, error) {
	var out []types.MultipartUpload
	in := &awss3.ListMultipartUploadsInput{Bucket: &s.cfg.Bucket, Prefix: &prefix}
	for {
		page, err := s.client.ListMultipartUploads(ctx, in)
		if err != nil {
			return nil, fmt.Errorf("s3: list uploads: %w", err)
		}
		out = append(out, page.Uploads...)
		if !aws.ToBool(page.IsTruncated) {
			return out, nil
		}
		in.KeyMarker, in.UploadIdMarker = page.NextKeyMarker, page.NextUploadIdMarker
	}
}

// upload streams one object. Whole lines fill a buffer; at partSize (ending
// at a line end) the buffer is sent as a part while the next one fills, so at
// most two parts are in memory. An object smaller than one part is a single PUT.
type upload struct {
	ctx      context.Context
	s        *Sink
	key      string
	partSize int64
	buf      []byte
	spare    []byte

	uploadID string
	parts    []types.CompletedPart
	next     int32
	wg       sync.WaitGroup
	mu       sync.Mutex
	err      error
	closed   bool
}

func (u *upload) Write(p []byte) (int, error) {
	if err := u.failed(); err != nil {
		return 0, err
	}
	u.buf = append(u.buf, p...)
	if int64(len(u.buf)) >= u.partSize && u.buf[len(u.buf)-1] == '\n' {
		if err := u.sendPart(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (u *upload) failed() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.err
}

func (u *upload) fail(err error) {
	u.mu.Lock()
	if u.err == nil {
		u.err = err
	}
	u.mu.Unlock()
}

// sendPart starts uploading the buffer after the previous part is done.
func (u *upload) sendPart() error {
	if u.uploadID == "" {
		out, err := u.s.client.CreateMultipartUpload(u.ctx, &awss3.CreateMultipartUploadInput{
			Bucket: &u.s.cfg.Bucket, Key: &u.key, ContentType: aws.String(contentType)})
		if err != nil {
			return fmt.Errorf("s3: start upload of %s: %w", u.key, err)
		}
		u.uploadID = aws.ToString(out.UploadId)
	}
	u.wg.Wait()
	if err := u.failed(); err != nil {
		return err
	}
	u.next++
	num, body := u.next, u.buf
	u.buf, u.spare = u.spare[:0], nil
	if u.buf == nil {
		u.buf = make([]byte, 0, cap(body))
	}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		out, err := u.s.client.UploadPart(u.ctx, &awss3.UploadPartInput{
			Bucket: &u.s.cfg.Bucket, Key: &u.key, UploadId: &u.uploadID, PartNumber: aws.Int32(num),
			Body: bytes.NewReader(body), ContentLength: aws.Int64(int64(len(body)))})
		if err != nil {
			u.fail(fmt.Errorf("s3: upload part %d of %s: %w", num, u.key, err))
			return
		}
		u.mu.Lock()
		u.parts = append(u.parts, types.CompletedPart{ETag: out.ETag, PartNumber: aws.Int32(num)})
		u.spare = body
		u.mu.Unlock()
	}()
	return nil
}

// Close finishes the object; on any failure the multipart upload is aborted.
func (u *upload) Close() error {
	if u.closed {
		return u.failed()
	}
	u.closed = true
	if u.uploadID == "" {
		if err := u.failed(); err != nil {
			return err
		}
		_, err := u.s.client.PutObject(u.ctx, &awss3.PutObjectInput{Bucket: &u.s.cfg.Bucket, Key: &u.key,
			Body: bytes.NewReader(u.buf), ContentLength: aws.Int64(int64(len(u.buf))), ContentType: aws.String(contentType)})
		if err != nil {
			return fmt.Errorf("s3: put %s: %w", u.key, err)
		}
		return nil
	}
	if len(u.buf) > 0 {
		if err := u.sendPart(); err != nil {
			u.abort()
			return err
		}
	}
	u.wg.Wait()
	if err := u.failed(); err != nil {
		u.abort()
		return err
	}
	sortParts(u.parts)
	_, err := u.s.client.CompleteMultipartUpload(u.ctx, &awss3.CompleteMultipartUploadInput{
		Bucket: &u.s.cfg.Bucket, Key: &u.key, UploadId: &u.uploadID,
		MultipartUpload: &types.CompletedMultipartUpload{Parts: u.parts}})
	if err != nil {
		u.abort()
		return fmt.Errorf("s3: complete %s: %w", u.key, err)
	}
	return nil
}

// Abort drops the object being written.
func (u *upload) Abort() error {
	u.closed = true
	u.wg.Wait()
	return u.abort()
}

func (u *upload) abort() error {
	if u.uploadID == "" {
		return nil
	}
	// The unit's context may be what was cancelled: abort regardless.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(u.ctx), time.Minute)
	defer cancel()
	_, err := u.s.client.AbortMultipartUpload(ctx, &awss3.AbortMultipartUploadInput{Bucket: &u.s.cfg.Bucket, Key: &u.key, UploadId: &u.uploadID})
	if err != nil {
		return fmt.Errorf("s3: abort %s: %w", u.key, err)
	}
	u.uploadID = ""
	return nil
}

func sortParts(p []types.CompletedPart) {
	for i := 1; i < len(p); i++ {
		for j := i; j > 0 && aws.ToInt32(p[j].PartNumber) < aws.ToInt32(p[j-1].PartNumber); j-- {
			p[j], p[j-1] = p[j-1], p[j]
		}
	}
}

var _ kiln.URLSink = (*Sink)(nil)

// Location implements kiln.LocatedSink: s3://bucket/prefix.
func (s *Sink) Location() string { return "s3://" + s.cfg.Bucket + "/" + s.cfg.Prefix }

// At implements kiln.LocatedSink: the same endpoint and credentials, the
// bucket and prefix of loc.
func (s *Sink) At(loc string) (kiln.Sink, error) {
	rest, ok := strings.CutPrefix(loc, "s3://")
	bucket, prefix, _ := strings.Cut(rest, "/")
	if !ok || bucket == "" {
		return nil, kiln.Errorf(kiln.EINVALID, "s3: %q is not an s3://bucket/prefix location", loc)
	}
	cfg := s.cfg
	cfg.Bucket, cfg.Prefix = bucket, strings.Trim(prefix, "/")
	return &Sink{cfg: cfg, client: s.client, presign: s.presign}, nil
}

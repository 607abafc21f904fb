package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/kiln-fhir/kiln"
	"github.com/kiln-fhir/kiln/localfs"
	"github.com/kiln-fhir/kiln/postgres"
	"github.com/kiln-fhir/kiln/s3"
	"github.com/kiln-fhir/kiln/sqlite"
)

// backend is what every store gives the commands.
type backend interface {
	kiln.ResourceStore
	kiln.ExportReader
	kiln.JobStore
	kiln.ViewStore
	kiln.SecretStore
	kiln.Outbox
	SetEvents(kiln.Events)
	Ping(context.Context) error
}

type storeFlags struct {
	kind, data, postgresURL, postgresSchema string
}

func (s *storeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&s.kind, "store", "sqlite", "sqlite (embedded, in --data) or postgres (--postgres-url)")
	fs.StringVar(&s.data, "data", "./kiln-data", "data folder: the embedded database and local export files")
	fs.StringVar(&s.postgresURL, "postgres-url", "", "PostgreSQL connection URL for --store postgres (postgres://user:pass@host:port/db)")
	fs.StringVar(&s.postgresSchema, "postgres-schema", "", "PostgreSQL schema for Kiln's tables, created if missing (default: the connection's search_path)")
}

func (s *storeFlags) open(ctx context.Context) (backend, io.Closer, error) {
	switch s.kind {
	case "sqlite":
		db, err := sqlite.Open(ctx, s.data)
		if err != nil {
			return nil, nil, err
		}
		return db, db, nil
	case "postgres":
		if s.postgresURL == "" {
			return nil, nil, fmt.Errorf("--store postgres needs --postgres-url (or KILN_POSTGRES_URL)")
		}
		db, err := postgres.Open(ctx, s.postgresURL, postgres.Options{Schema: s.postgresSchema})
		if err != nil {
			return nil, nil, err
		}
		return db, db, nil
	}
	return nil, nil, fmt.Errorf("--store %q: use sqlite or postgres", s.kind)
}

type sinkFlags struct {
	kind string
	s3   s3.Config
}

func (f *sinkFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.kind, "sink", "local", "where export files go: local (the data folder, served by Kiln) or s3")
	fs.StringVar(&f.s3.Bucket, "s3-bucket", "", "S3 bucket for --sink s3")
	fs.StringVar(&f.s3.Prefix, "s3-prefix", "", "key prefix for export objects")
	fs.StringVar(&f.s3.Endpoint, "s3-endpoint", "", "S3 endpoint URL for S3-compatible servers (default: AWS)")
	fs.BoolVar(&f.s3.PathStyle, "s3-path-style", false, "path-style S3 addressing (bucket in the path), for S3-compatible servers")
	fs.StringVar(&f.s3.Region, "s3-region", "us-east-1", "S3 region")
	fs.StringVar(&f.s3.URLStyle, "s3-url-style", "presigned", "manifest URLs: presigned (HTTPS, no credentials needed) or s3 (s3://bucket/key, Helix's form)")
	fs.DurationVar(&f.s3.URLExpiry, "s3-url-expiry", time.Hour, "lifetime of presigned URLs; re-polling the status gives fresh ones")
}

func (f *sinkFlags) open(ctx context.Context, data string) (kiln.Sink, error) {
	switch f.kind {
	case "local":
		return localfs.New(filepath.Join(data, "exports"))
	case "s3":
		return s3.New(ctx, f.s3)
	}
	return nil, fmt.Errorf("--sink %q: use local or s3", f.kind)
}

package main

import (
	"context"
	"io"
	"strings"
)

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func cmdBench(ctx context.Context, args []string, stdout, stderr io.Writer) error { return nil }

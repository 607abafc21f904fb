# A small static image of kiln: `docker build -t kiln .`
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /kiln ./cmd/kiln

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /kiln /kiln
USER 65532:65532
ENTRYPOINT ["/kiln"]

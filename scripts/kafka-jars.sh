#!/usr/bin/env bash
# Fetches Apache Kafka's broker jars from Maven Central into a git-ignored cache folder
# and prints that folder. The tests start a single-node KRaft broker from it
# (runtime/tests/common/apache.rs); scripts/test-all.sh runs this and exports the folder
# as PACER_KAFKA_JARS.
#
# The version is pinned here and only here. A second run finds the folder complete (its
# marker file written last) and only prints it. ~/.m2 caches the downloads.
set -euo pipefail

KAFKA_VERSION="4.4.0"
SLF4J_VERSION="2.0.17"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/.tools/kafka-$KAFKA_VERSION"
MARK="$DIR/.complete"

if [[ -f "$MARK" ]]; then
  echo "$DIR"
  exit 0
fi

for cmd in java mvn; do
  if ! command -v "$cmd" >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
    else
      echo "kafka-jars: '$cmd' is missing (Kafka $KAFKA_VERSION needs Java 17+ and Maven to fetch it)" >&2
      exit 1
    fi
  fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.pacer</groupId>
  <artifactId>kafka-broker-jars</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- kafka_2.13 brings slf4j-api 1.7, which cannot bind slf4j-simple 2.x (the broker
         would log nothing): name the 2.x API so it wins. -->
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-simple</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM
rm -rf "$DIR"
mkdir -p "$DIR"
echo "kafka-jars: fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION from Maven Central" >&2
mvn -q -B -f "$work/pom.xml" dependency:copy-dependencies \
  -DoutputDirectory="$DIR" -DincludeScope=runtime >&2
ls "$DIR"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null
echo "$KAFKA_VERSION" > "$MARK"
echo "$DIR"

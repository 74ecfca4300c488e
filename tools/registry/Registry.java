// The dev stack's Schema Registry: Confluent's REST API (the subset Debezium's Avro converter and
// cdc-lake use) served over Confluent's own registry classes. No registry server can be installed
// on these machines, so this stand-in keeps the behaviour that matters in the vendor's code:
// schema parsing and canonical form (AvroSchema), id and version assignment
// (MockSchemaRegistryClient) and the compatibility rules (AvroSchema.isBackwardCompatible via
// testCompatibility). Only the HTTP layer and the persistence below are ours.
//
// Registrations are appended to a log file and registered again, in order, at start-up, so a
// restarted registry serves the same ids (a real registry keeps them in its _schemas topic).
//
// Usage: java -cp 'libs/*:classes' Registry <port> <log file>
//
// Paths (https://docs.confluent.io/platform/current/schema-registry/develop/api.html):
//   POST /subjects/{s}/versions                register (409 when incompatible, 422 when invalid)
//   POST /subjects/{s}                         look a schema up under a subject
//   GET  /schemas/ids/{id}                     the schema of an id (404, error 40403, if unknown)
//   GET  /subjects, /subjects/{s}/versions, /subjects/{s}/versions/{v|latest}
//   GET|PUT /config, /config/{s}               compatibility level
//   POST /compatibility/subjects/{s}/versions/{v|latest}
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import io.confluent.kafka.schemaregistry.ParsedSchema;
import io.confluent.kafka.schemaregistry.avro.AvroSchema;
import io.confluent.kafka.schemaregistry.client.MockSchemaRegistryClient;
import io.confluent.kafka.schemaregistry.client.SchemaMetadata;
import io.confluent.kafka.schemaregistry.client.rest.exceptions.RestClientException;
import java.io.BufferedReader;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardOpenOption;
import java.util.concurrent.Executors;

public class Registry {
    static final ObjectMapper JSON = new ObjectMapper();
    static final MockSchemaRegistryClient REGISTRY = new MockSchemaRegistryClient();
    static Path log;

    /** A response with Confluent's error body. */
    static final class Failure extends Exception {
        final int status;
        final int code;

        Failure(int status, int code, String message) {
            super(message);
            this.status = status;
            this.code = code;
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: Registry <port> <log file>");
            System.exit(2);
        }
        log = Paths.get(args[1]);
        if (Files.exists(log)) {
            int n = 0;
            try (BufferedReader in = Files.newBufferedReader(log)) {
                for (String line; (line = in.readLine()) != null; ) {
                    if (line.isBlank()) continue;
                    JsonNode entry = JSON.readTree(line);
                    REGISTRY.register(entry.get("subject").asText(), parse(entry.get("schema").asText()));
                    n++;
                }
            }
            System.err.println("registry: restored " + n + " registrations from " + log);
        }
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", Integer.parseInt(args[0])), 64);
        server.createContext("/", Registry::handle);
        server.setExecutor(Executors.newFixedThreadPool(8));
        server.start();
        System.err.println("registry listening on 127.0.0.1:" + args[0]);
    }

    static void handle(HttpExchange ex) throws IOException {
        int status = 200;
        Object body;
        try {
            body = route(ex.getRequestMethod(), ex.getRequestURI().getRawPath(), ex);
        } catch (Failure f) {
            status = f.status;
            ObjectNode err = JSON.createObjectNode();
            err.put("error_code", f.code);
            err.put("message", f.getMessage());
            body = err;
        } catch (Exception e) {
            status = 500;
            ObjectNode err = JSON.createObjectNode();
            err.put("error_code", 50001);
            err.put("message", String.valueOf(e));
            body = err;
        }
        byte[] out = JSON.writeValueAsBytes(body);
        ex.getResponseHeaders().set("Content-Type", "application/vnd.schemaregistry.v1+json");
        ex.sendResponseHeaders(status, out.length);
        try (OutputStream os = ex.getResponseBody()) {
            os.write(out);
        }
    }

    static Object route(String method, String rawPath, HttpExchange ex) throws Exception {
        String[] p = rawPath.replaceAll("^/+|/+$", "").split("/");
        for (int i = 0; i < p.length; i++) p[i] = URLDecoder.decode(p[i], StandardCharsets.UTF_8);
        String route = method + " " + String.join("/", shape(p));
        switch (route) {
            case "GET schemas/ids/*": {
                ParsedSchema s = byId(Integer.parseInt(p[2]));
                ObjectNode o = JSON.createObjectNode();
                o.put("schema", s.canonicalString());
                return o;
            }
            case "GET subjects":
                return REGISTRY.getAllSubjects();
            case "GET subjects/*/versions":
                return versions(p[1]);
            case "GET subjects/*/versions/*":
                return metadata(p[1], version(p[1], p[3]));
            case "POST subjects/*/versions": {
                String subject = p[1];
                ParsedSchema schema = requestSchema(ex);
                synchronized (REGISTRY) {
                    boolean known = !versionsOrEmpty(subject).isEmpty() && lookup(subject, schema) >= 0;
                    if (!known && !versionsOrEmpty(subject).isEmpty() && !REGISTRY.testCompatibility(subject, schema)) {
                        throw new Failure(409, 409, "Schema being registered is incompatible with an earlier schema for subject \"" + subject + "\"");
                    }
                    int id = REGISTRY.register(subject, schema);
                    if (!known) {
                        ObjectNode entry = JSON.createObjectNode();
                        entry.put("subject", subject);
                        entry.put("schema", schema.canonicalString());
                        Files.writeString(log, JSON.writeValueAsString(entry) + "\n", StandardOpenOption.CREATE, StandardOpenOption.APPEND);
                    }
                    ObjectNode o = JSON.createObjectNode();
                    o.put("id", id);
                    return o;
                }
            }
            case "POST subjects/*": {
                ParsedSchema schema = requestSchema(ex);
                int version = lookup(p[1], schema);
                if (version < 0) throw new Failure(404, 40403, "Schema not found");
                return metadata(p[1], version);
            }
            case "POST compatibility/subjects/*/versions/*": {
                ParsedSchema schema = requestSchema(ex);
                ObjectNode o = JSON.createObjectNode();
                o.put("is_compatible", versionsOrEmpty(p[2]).isEmpty() || REGISTRY.testCompatibility(p[2], schema));
                return o;
            }
            case "GET config":
            case "GET config/*": {
                ObjectNode o = JSON.createObjectNode();
                o.put("compatibilityLevel", REGISTRY.getCompatibility(p.length > 1 ? p[1] : null));
                return o;
            }
            case "PUT config":
            case "PUT config/*": {
                String level = JSON.readTree(ex.getRequestBody()).path("compatibility").asText();
                REGISTRY.updateCompatibility(p.length > 1 ? p[1] : null, level);
                ObjectNode o = JSON.createObjectNode();
                o.put("compatibility", level);
                return o;
            }
            default:
                throw new Failure(404, 404, "HTTP 404 Not Found: " + method + " /" + String.join("/", p));
        }
    }

    /** The path with its variable segments as `*`, for the switch above. */
    static String[] shape(String[] p) {
        String[] s = p.clone();
        if (s.length >= 3 && s[0].equals("schemas") && s[1].equals("ids")) s[2] = "*";
        if (s.length >= 2 && (s[0].equals("subjects") || s[0].equals("config"))) s[1] = "*";
        if (s.length >= 4 && s[0].equals("subjects") && s[2].equals("versions")) s[3] = "*";
        if (s.length >= 5 && s[0].equals("compatibility")) {
            s[2] = "*";
            s[4] = "*";
        }
        if (s.length == 1 && s[0].isEmpty()) return new String[0];
        return s;
    }

    static ParsedSchema parse(String text) throws Failure {
        try {
            AvroSchema schema = new AvroSchema(text);
            schema.validate();
            return schema;
        } catch (Exception e) {
            throw new Failure(422, 42201, "Invalid schema: " + e.getMessage());
        }
    }

    static ParsedSchema requestSchema(HttpExchange ex) throws IOException, Failure {
        JsonNode req = JSON.readTree(ex.getRequestBody());
        String type = req.path("schemaType").asText("AVRO");
        if (!type.equals("AVRO")) throw new Failure(422, 42201, "Only AVRO schemas are supported by this registry");
        if (req.path("references").size() > 0) throw new Failure(422, 42201, "Schema references are not supported by this registry");
        return parse(req.path("schema").asText());
    }

    static ParsedSchema byId(int id) throws Exception {
        try {
            return REGISTRY.getSchemaById(id);
        } catch (RestClientException e) {
            throw new Failure(404, 40403, "Schema " + id + " not found");
        }
    }

    static java.util.List<Integer> versionsOrEmpty(String subject) throws IOException {
        try {
            return REGISTRY.getAllVersions(subject);
        } catch (RestClientException e) {
            return java.util.List.of();
        }
    }

    static java.util.List<Integer> versions(String subject) throws Exception {
        java.util.List<Integer> v = versionsOrEmpty(subject);
        if (v.isEmpty()) throw new Failure(404, 40401, "Subject '" + subject + "' not found.");
        return v;
    }

    static int version(String subject, String v) throws Exception {
        java.util.List<Integer> all = versions(subject);
        if (v.equals("latest") || v.equals("-1")) return all.get(all.size() - 1);
        int n = Integer.parseInt(v);
        if (!all.contains(n)) throw new Failure(404, 40402, "Version " + v + " not found.");
        return n;
    }

    /** The version of this schema under the subject, or -1 (404 when the subject is unknown). */
    static int lookup(String subject, ParsedSchema schema) throws Exception {
        for (int v : versions(subject)) {
            if (parse(REGISTRY.getSchemaMetadata(subject, v).getSchema()).equals(schema)) return v;
        }
        return -1;
    }

    static ObjectNode metadata(String subject, int version) throws Exception {
        SchemaMetadata m = REGISTRY.getSchemaMetadata(subject, version);
        ObjectNode o = JSON.createObjectNode();
        o.put("subject", subject);
        o.put("id", m.getId());
        o.put("version", m.getVersion());
        o.put("schema", m.getSchema());
        return o;
    }
}

import Foundation

/// Backups in a test run seconds apart; tests of time-based behaviour (`restore --at TIME`,
/// retention by calendar) give the layers the `created` times they need instead of waiting.
public enum RepositoryTimes {
    public struct NotJSON: Error, CustomStringConvertible {
        public let path: String
        public var description: String { "\(path) is not a JSON object" }
    }

    /// Sets each layer's `created` (by stable index) in the manifest and in the layer's sidecar.
    public static func setCreated(_ repo: String, _ times: [Int: String]) throws {
        func rewrite(_ path: String, _ change: (inout [String: Any]) -> Void) throws {
            guard var json = try JSONSerialization.jsonObject(with: Data.contents(of: path)) as? [String: Any] else {
                throw NotJSON(path: path)
            }
            change(&json)
            try JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
                .write(to: URL(fileURLWithPath: path))
        }
        var files: [Int: String] = [:]
        try rewrite(repo + "/manifest.json") { manifest in
            var layers = manifest["layers"] as? [[String: Any]] ?? []
            for i in layers.indices {
                guard let index = layers[i]["index"] as? Int, let time = times[index] else { continue }
                layers[i]["created"] = time
                files[index] = layers[i]["file"] as? String
            }
            manifest["layers"] = layers
        }
        for (index, file) in files {
            try rewrite("\(repo)/\(file).json") { sidecar in
                var layer = sidecar["layer"] as? [String: Any] ?? [:]
                layer["created"] = times[index]
                sidecar["layer"] = layer
            }
        }
    }
}

import Foundation

/// Parsing JSON output of qbackup and qemu tools in tests.
public enum JSONHelpers {
    public static func parse(_ text: String) throws -> Any {
        try JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed])
    }

    /// `qemu-img map --output=json` extents with adjacent equal extents merged
    /// (same depth/present/zero/data, contiguous offsets), as [[String: Any]].
    public static func mergedMap(_ text: String) throws -> [[String: Any]] {
        guard let extents = try parse(text) as? [[String: Any]] else { return [] }
        var out: [[String: Any]] = []
        for e in extents {
            if var last = out.last,
               (last["depth"] as? Int) == (e["depth"] as? Int),
               (last["present"] as? Bool) == (e["present"] as? Bool),
               (last["zero"] as? Bool) == (e["zero"] as? Bool),
               (last["data"] as? Bool) == (e["data"] as? Bool),
               let ls = last["start"] as? Int, let ll = last["length"] as? Int, let s = e["start"] as? Int,
               ls + ll == s
            {
                let lo = last["offset"] as? Int
                let eo = e["offset"] as? Int
                if (lo == nil && eo == nil) || (lo != nil && eo != nil && lo! + ll == eo!) {
                    last["length"] = ll + ((e["length"] as? Int) ?? 0)
                    out[out.count - 1] = last
                    continue
                }
            }
            out.append(e)
        }
        return out
    }

    /// What `qemu-img map --output=json` says is allocated where (extents merged, host
    /// offsets left out), as one comparable string: two images with the same text have the
    /// same layout of data, zeros and holes.
    public static func allocation(of path: String, format: String = "qcow2") throws -> String {
        let extents = try mergedMap(Tools.qemuImg("map", "--output=json", "-f", format, path).stdout)
        let withoutOffsets = extents.map { $0.filter { $0.key != "offset" } }
        return try mergedMap(canonical(withoutOffsets)).map(canonical).joined(separator: "\n")
    }

    /// A stable text form of a JSON value (sorted keys), for equality checks and readable diffs.
    public static func canonical(_ value: Any) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .fragmentsAllowed]) else {
            return "\(value)"
        }
        return String(decoding: data, as: UTF8.self)
    }
}

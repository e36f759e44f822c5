import BackupChain
import FoundationEssentials

/// What a live backup does with bitmap NAME in QEMU, from its state (DESIGN,
/// "Live backup of a running VM"):
/// - missing → add it in the start transaction (a full layer);
/// - inconsistent (or not persistent) → remove it, then add it again in the transaction (a full layer);
/// - disabled → enable and clear it in the transaction (a full layer);
/// - recording → freeze: its bits move into a disabled NAME.frozen and NAME is
///   cleared, in the transaction (incremental when the chain allows, else full;
///   a failure merges the bits back either way).
struct BitmapPlan {
    enum State: Equatable { case missing, inconsistent, disabled, recording }

    let name: String
    let state: State
    let incremental: Bool
    /// Why the layer is full, when it is (for the output); nil for an incremental.
    let reason: String?

    static func frozen(_ name: String) -> String { "\(name).frozen" }

    /// Decides from the request, the repository's manifest and QEMU's bitmaps. Refuses what
    /// `--incremental` cannot do, and a new repository's `--bitmap` that already exists in QEMU.
    init(request: QMPBackup.Request, manifest: BackupManifest?, disk: QMPDisk, id: String? = nil) throws {
        let id = manifest?.id ?? id ?? "<new id>"
        name = manifest?.bitmap ?? request.bitmap ?? "qbackup-\(id)"
        let found = disk.bitmaps[name]
        if let found, found.busy {
            throw LiveError(.refused, "bitmap '\(name)' on node '\(disk.node)' is in use by another operation (another backup running?)")
        }
        if manifest == nil, request.bitmap != nil, found != nil, !request.takeOverBitmap {
            throw LiveError(.refused, "bitmap '\(name)' already exists on node '\(disk.node)' and may belong to another repository (taking it over would make that one miss changes); choose another --bitmap, or pass --take-over-bitmap")
        }
        switch found {
        case nil: state = .missing
        case let b? where b.inconsistent || !b.persistent: state = .inconsistent
        case let b? where !b.recording: state = .disabled
        default: state = .recording
        }
        let hasChain = !(manifest?.layers.isEmpty ?? true)
        var why: String?
        if request.mode == .full {
            why = "--full was asked for"
        } else if !hasChain {
            why = "the repository holds no backup yet"
        } else {
            switch state {
            case .missing: why = "bitmap '\(name)' is missing on node '\(disk.node)', so changes since the last backup are unknown"
            case .inconsistent:
                why = found?.inconsistent == true
                    ? "bitmap '\(name)' on node '\(disk.node)' is inconsistent (QEMU did not close the image cleanly)"
                    : "bitmap '\(name)' on node '\(disk.node)' is not persistent, so it may have missed writes"
            case .disabled: why = "bitmap '\(name)' on node '\(disk.node)' is disabled and may have missed writes"
            case .recording: why = nil
            }
        }
        if request.mode == .incremental, let why {
            throw LiveError(.refused, "cannot take an incremental backup: \(why); only --full is allowed")
        }
        incremental = why == nil
        reason = why
    }

    /// Before the start transaction: an inconsistent (or non-persistent) NAME is removed; it
    /// tracks nothing that can be trusted, and the layer is full either way.
    func prepare(_ qmp: QMPClient, node: String) throws {
        if state == .inconsistent {
            try qmp.execute("block-dirty-bitmap-remove", ["node": node, "name": name])
        }
    }

    /// The bitmap actions of the start transaction.
    func startActions(node: String) -> [[String: Any]] {
        func action(_ type: String, _ data: [String: Any]) -> [String: Any] {
            ["type": type, "data": data.merging(["node": node]) { a, _ in a }]
        }
        switch state {
        case .missing:
            return [action("block-dirty-bitmap-add", ["name": name, "persistent": true])]
        case .inconsistent:
            // Removed by `prepare`: QEMU refuses to add a name that the same transaction removes.
            return [action("block-dirty-bitmap-add", ["name": name, "persistent": true])]
        case .disabled:
            return [action("block-dirty-bitmap-enable", ["name": name]),
                    action("block-dirty-bitmap-clear", ["name": name])]
        case .recording:
            return [action("block-dirty-bitmap-add", ["name": Self.frozen(name), "persistent": true, "disabled": true]),
                    action("block-dirty-bitmap-merge", ["target": Self.frozen(name), "bitmaps": [name]]),
                    action("block-dirty-bitmap-clear", ["name": name])]
        }
    }

    /// After cleanup (the export no longer holds NAME.frozen): a committed layer drops
    /// NAME.frozen; a failure merges it back into NAME. Where there was nothing to freeze,
    /// a failure removes NAME, so that the next backup is a full one.
    func finish(_ qmp: QMPClient, node: String, committed: Bool) throws {
        switch (state, committed) {
        case (.recording, true):
            try qmp.execute("block-dirty-bitmap-remove", ["node": node, "name": Self.frozen(name)])
        case (.recording, false):
            try Self.mergeBack(qmp, node: node, name: name)
        case (_, true):
            break
        case (_, false):
            try qmp.execute("block-dirty-bitmap-remove", ["node": node, "name": name])
        }
    }

    /// Merges NAME.frozen back into NAME and removes it, in one transaction (NAME is added
    /// first if it went missing). An inconsistent NAME.frozen cannot be merged: it is
    /// removed, and NAME too, so that the next layer is full.
    /// Returns what was done, for the output.
    static func mergeBack(_ qmp: QMPClient, disk: QMPDisk, name: String) throws -> String {
        let frozenName = frozen(name)
        if disk.bitmaps[frozenName]?.inconsistent == true || disk.bitmaps[name]?.inconsistent == true {
            var actions: [[String: Any]] = [["type": "block-dirty-bitmap-remove", "data": ["node": disk.node, "name": frozenName]]]
            if disk.bitmaps[name] != nil {
                actions.append(["type": "block-dirty-bitmap-remove", "data": ["node": disk.node, "name": name]])
            }
            try qmp.execute("transaction", ["actions": actions])
            return "removed the inconsistent bitmaps '\(name)' and '\(frozenName)' an interrupted backup left (QEMU did not close the image cleanly), so this layer is full"
        }
        try mergeBack(qmp, node: disk.node, name: name, addTarget: disk.bitmaps[name] == nil)
        return "merged bitmap '\(frozenName)' left by an interrupted backup back into '\(name)'"
    }

    static func mergeBack(_ qmp: QMPClient, node: String, name: String, addTarget: Bool = false) throws {
        var actions: [[String: Any]] = []
        if addTarget {
            actions.append(["type": "block-dirty-bitmap-add", "data": ["node": node, "name": name, "persistent": true]])
        }
        actions.append(["type": "block-dirty-bitmap-merge", "data": ["node": node, "target": name, "bitmaps": [frozen(name)]]])
        actions.append(["type": "block-dirty-bitmap-remove", "data": ["node": node, "name": frozen(name)]])
        try qmp.execute("transaction", ["actions": actions])
    }
}

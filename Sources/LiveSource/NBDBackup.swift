import BackupChain
import QCowImage
import FoundationEssentials
import Logging

/// `qbackup backup --nbd URI`: a backup from an export someone else set up
/// (qemu-nbd, a pull-mode export). Data comes from the export; with a bitmap,
/// changes from its `qemu:dirty-bitmap:NAME` context (refused when the export
/// lacks it), else every backup is a full layer. The bitmap is the exporter's:
/// qbackup never resets it, so where its tracking starts is the exporter's business.
public enum NBDBackup {
    public struct Request: Sendable {
        public var uri: String
        public var repository: String
        public var bitmap: String?
        /// The manifest's name of the disk (default: the URI).
        public var sourceName: String?
        public var mode: BackupEngine.Mode
        public var compression: CompressionType?
        public var dryRun: Bool
        public var clusterSize: Int?
        public init(uri: String, repository: String, bitmap: String? = nil, sourceName: String? = nil,
                    mode: BackupEngine.Mode = .auto, compression: CompressionType? = nil, dryRun: Bool = false,
                    clusterSize: Int? = nil) {
            self.uri = uri
            self.repository = repository
            self.bitmap = bitmap
            self.sourceName = sourceName
            self.mode = mode
            self.compression = compression
            self.dryRun = dryRun
            self.clusterSize = clusterSize
        }
    }

    public static func backup(_ request: Request, logger: Logger = Logger(label: "qbackup.nbd"),
                              progress: ((UInt64, UInt64) -> Void)? = nil) throws -> BackupEngine.Result {
        if request.bitmap == nil && request.mode == .incremental {
            throw LiveError(.invalidArgument, "--incremental needs --bitmap NAME: an NBD export without a bitmap context says nothing about changes")
        }
        // Without a bitmap there are no changes to follow: every layer is full. The engine's
        // check that a new repository does not take over another's bitmap does not apply:
        // qbackup resets nothing on an export.
        let engine = BackupEngine.Request(image: request.uri, repository: request.repository, bitmap: request.bitmap,
                                          mode: request.bitmap == nil ? .full : request.mode,
                                          compression: request.compression, dryRun: request.dryRun,
                                          clusterSize: request.clusterSize, takeOverBitmap: true)
        let name = request.sourceName ?? request.uri
        return try BackupEngine.backup(engine, logger: logger, progress: progress) { _, _ in
            let source = try NBDSource(uri: request.uri, name: name,
                                       tracking: request.bitmap.map { NBDSource.Tracking(name: $0, exported: $0) })
            // The manifest records the export by the name given, else by its URI.
            if let given = request.sourceName { source.disk = BackupManifest.Source(kind: .nbd, name: given) }
            return source
        }
    }
}
